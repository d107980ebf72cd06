"""sparseft: prune, sparse fine-tune, export and run large language models sparse and fast."""

from sparseft.api import export, finetune, load, prune
from sparseft.errors import SparseftError

__version__ = "0.1.0"
__all__ = ["SparseftError", "__version__", "export", "finetune", "load", "prune"]
