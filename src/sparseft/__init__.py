"""sparseft: prune, sparse fine-tune, export and run large language models sparse and fast."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sparseft.errors import SparseftError

if TYPE_CHECKING:
    from sparseft.api import evaluate, export, finetune, load, prune
    from sparseft.eval.seq2seq import Seq2SeqEvalConfig
    from sparseft.formats.config import ExportConfig
    from sparseft.pruning.config import PruneConfig

__version__ = "0.1.0"
__all__ = [
    "ExportConfig",
    "PruneConfig",
    "Seq2SeqEvalConfig",
    "SparseftError",
    "__version__",
    "evaluate",
    "export",
    "finetune",
    "load",
    "prune",
]

# The API is imported on first use, not with the package: `sparseft.api` imports torch and transformers, which
# `import sparseft.cli` and `sparseft --help` should not wait for.
_LAZY = {
    "evaluate": "sparseft.api",
    "export": "sparseft.api",
    "finetune": "sparseft.api",
    "load": "sparseft.api",
    "prune": "sparseft.api",
    "PruneConfig": "sparseft.pruning.config",
    "ExportConfig": "sparseft.formats.config",
    "Seq2SeqEvalConfig": "sparseft.eval.seq2seq",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sparseft' has no attribute {name!r}")
