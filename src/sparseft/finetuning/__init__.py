"""Sparse fine-tuning: the recipe (`config`), the losses (`losses`), the masks that keep pruned weights at zero
(`masks`), the training loop (`loop`) and its checkpoints (`checkpoints`, `distributed`), and the stages a recipe
runs in order (`stages`)."""
