"""`sparseft demo` and its fixtures: the whole pipeline on the bundled math task (`pipeline`), and the small offline
models, tokenizers and corpus it starts from, which the tests and benchmarks use too (`tiny`). The library never
imports this package; the CLI's `demo` verb does, when it runs."""
