"""Evaluation metrics: perplexity, GSM8K-style accuracy, BLEU and WER of generated text, and lm-evaluation-harness
tasks on a model as sparseft loads it. `sparseft.evaluate` (and `sparseft eval`) runs them with their protocol
recorded beside the figure."""
