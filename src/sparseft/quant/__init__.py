"""Weight quantization that keeps zeros zero: the int8/int4 scheme and round-to-nearest (`spec`), GPTQ on one
matrix (`gptq`), and both over a model's target linears (`model`)."""
