"""sparseft: prune, sparse fine-tune, export and run large language models sparse and fast."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sparseft.errors import SparseftError

if TYPE_CHECKING:
    from sparseft.api import evaluate, export, finetune, load, prune
    from sparseft.pruning.config import PruneConfig

__version__ = "0.1.0"
__all__ = ["PruneConfig", "SparseftError", "__version__", "evaluate", "export", "finetune", "load", "prune"]

# The API is imported on first use, not with the package: `sparseft.api` imports torch and transformers, which
# `import sparseft.cli` and `sparseft --help` should not wait for.
_API = ("evaluate", "export", "finetune", "load", "prune")


def __getattr__(name: str) -> Any:
    if name in _API:
        from sparseft import api

        return getattr(api, name)
    if name == "PruneConfig":
        from sparseft.pruning.config import PruneConfig

        return PruneConfig
    raise AttributeError(f"module 'sparseft' has no attribute {name!r}")
