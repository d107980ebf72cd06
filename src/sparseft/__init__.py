"""sparseft: prune, sparse fine-tune, export and run large language models sparse and fast."""

# `sparseft.evaluate` is the function; it hides the metrics module of the same name as an attribute, so import
# from that module by its full name (`from sparseft.evaluate import gsm8k_accuracy`), not `import ... as`.
from sparseft.api import evaluate, export, finetune, load, prune
from sparseft.errors import SparseftError

__version__ = "0.1.0"
__all__ = ["SparseftError", "__version__", "evaluate", "export", "finetune", "load", "prune"]
