"""The CPU sparse runtime: `SparseLinear` (bitmask + packed bf16 or int8 values, AVX-512/AVX2/portable
kernels), `sparsify_(model)` to convert a pruned model in place, and `load(DIR)` to build one straight from a
bitmask archive or pruned checkpoint: the runtime's own decoder (`runtime.models`) for the Llama family,
transformers' model code with sparse linears for the rest. `set_isa` / `SPARSEFT_ISA` force a kernel level."""

from sparseft.runtime.convert import load, sparsify_
from sparseft.runtime.dispatch import available_isas, best_isa, current_isa, set_isa
from sparseft.runtime.linear import DenseLinear, SparseLinear

__all__ = [
    "DenseLinear",
    "SparseLinear",
    "available_isas",
    "best_isa",
    "current_isa",
    "load",
    "set_isa",
    "sparsify_",
]
