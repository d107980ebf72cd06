"""The package as users import it: every module imports, and the public names stay what they are."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import sparseft
from sparseft import api
from sparseft.eval.seq2seq import Seq2SeqEvalConfig
from sparseft.formats.config import ExportConfig
from sparseft.pruning.config import PruneConfig

OPTIONAL = {"triton", "fastapi", "uvicorn", "prometheus_client", "lm_eval"}  # the extras' packages


def test_every_module_imports_and_no_module_hides_a_public_function() -> None:
    """A subpackage named like an API function (`sparseft.evaluate` was both) would be bound over the function on
    import; importing every module first shows that none is."""
    for module in pkgutil.walk_packages(sparseft.__path__, "sparseft."):
        try:
            importlib.import_module(module.name)
        except ModuleNotFoundError as e:
            if e.name is None or e.name.split(".")[0] not in OPTIONAL:
                raise
    for name in ("prune", "finetune", "export", "load", "evaluate"):
        assert getattr(sparseft, name) is getattr(api, name), name
    assert (sparseft.PruneConfig, sparseft.ExportConfig, sparseft.Seq2SeqEvalConfig) == (
        PruneConfig,
        ExportConfig,
        Seq2SeqEvalConfig,
    )


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'prunes'"):
        sparseft.prunes  # noqa: B018
