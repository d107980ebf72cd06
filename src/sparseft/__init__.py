"""sparseft: prune, sparse fine-tune, export and run large language models sparse and fast."""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from sparseft.errors import SparseftError

if TYPE_CHECKING:
    from sparseft.api import evaluate, export, finetune, load, prune

__version__ = "0.1.0"
__all__ = ["SparseftError", "__version__", "evaluate", "export", "finetune", "load", "prune"]

# The API's functions are imported on first use, not with the package: `sparseft.api` imports torch and
# transformers (seconds), which `import sparseft.cli` and `sparseft --help` should not wait for.
_API = ("evaluate", "export", "finetune", "load", "prune")


def __getattr__(name: str) -> Any:
    if name in _API:
        from sparseft import api

        return getattr(api, name)
    raise AttributeError(f"module 'sparseft' has no attribute {name!r}")


class _Package(types.ModuleType):
    """`sparseft.evaluate` is the function, and stays so when the metrics module of the same name is imported:
    importing a submodule binds it as an attribute of its package, which would hide the function. So import from
    that module by its full name (`from sparseft.evaluate import gsm8k_accuracy`), not `import ... as`."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "evaluate" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
