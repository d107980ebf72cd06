"""Data, read from local files or the `datasets` hub: records (`records`), text for calibration and perplexity
(`text`), fine-tuning task rows (`tasks`), encoder-decoder translation and speech examples (`seq2seq`), their
batches and the calibration samples of a recipe's prune stages (`batch`), and the bundled math task (`mathtask`)."""

IGNORE_INDEX = -100  # the label of tokens that carry no loss (prompt, padding), as in Hugging Face models
