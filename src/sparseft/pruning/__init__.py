"""One-shot pruning: choosing what to remove (`masks`), the algorithms on one weight matrix (`magnitude`, `wanda`,
`sparsegpt`, with the OBS maths SparseGPT shares with GPTQ in `obs`), the block-by-block calibration driver that
runs them over a model (`sequential`), and the settings (`config`)."""
