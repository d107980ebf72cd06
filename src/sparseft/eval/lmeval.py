"""Bridge to lm-evaluation-harness (`pip install 'sparseft[eval]'`): run any of its tasks on a loaded model.

The model is handed to lm-eval's `HFLM` as an already-built module, so whatever sparseft produced runs as it is:
dense, pruned, fine-tuned, or with runtime `SparseLinear` modules swapped in. lm-eval fetches most task datasets
from the Hugging Face hub; offline, point `include_path` at a folder of task YAMLs over local files
(`dataset_path: json` with `dataset_kwargs: {data_files: ...}`).
"""

from __future__ import annotations

import difflib
import functools
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from sparseft.errors import SparseftError, SparseftWarning, first_line

PREFIX = "lm-eval:"


def _lm_eval() -> Any:
    """lm_eval, imported only when used: it is a large optional dependency."""
    try:
        import lm_eval
        import lm_eval.models.huggingface
        import lm_eval.tasks
    except ImportError as e:
        raise SparseftError(
            f"lm-eval is needed for {PREFIX}TASK evaluations but cannot be imported ({e}); "
            "install it with `pip install 'sparseft[eval]'`"
        ) from e
    return lm_eval


def wrap(model: nn.Module, tokenizer: Any, batch_size: int = 8, max_length: int | None = None) -> Any:
    """lm-eval's HFLM around an already loaded causal LM; it uses the model's own device and dtype."""
    lm_eval = _lm_eval()
    config = getattr(model, "generation_config", None)
    stops = getattr(config, "eos_token_id", None)
    stops = stops if isinstance(stops, list) else [stops]
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
        # lm-eval's generation stops on the model's configured EOS only; a mismatch runs every answer to
        # max_gen_toks and scores the garbage after the real end.
        warnings.warn(
            f"the model's generation_config.eos_token_id {stops} does not hold the tokenizer's EOS "
            f"{tokenizer.eos_token_id}; lm-eval generation tasks will not stop at it",
            SparseftWarning,
            stacklevel=2,
        )
    return lm_eval.models.huggingface.HFLM(
        pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length
    )


def task_manager(include_path: str | Path | None = None, include_defaults: bool = True) -> Any:
    """lm-eval's index of tasks: its own (unless `include_defaults` is False) plus the YAMLs in `include_path`."""
    if include_path is not None and not Path(include_path).is_dir():
        raise SparseftError(f"lm-eval task folder {include_path} does not exist; pass a folder of task YAMLs")
    return _indexed(None if include_path is None else str(Path(include_path).resolve()), include_defaults)


@functools.lru_cache(maxsize=4)
def _indexed(include_path: str | None, include_defaults: bool) -> Any:
    # Indexing lm-eval's ~15k task configs takes seconds; a study that evaluates many models pays it once.
    return _lm_eval().tasks.TaskManager(include_path=include_path, include_defaults=include_defaults)


def check_tasks(tasks: Sequence[str], manager: Any) -> None:
    """Fail before any model work on task names lm-eval does not know, suggesting the closest ones."""
    known = manager.all_tasks
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; `lm-eval ls tasks` lists them"
            raise SparseftError(f"lm-eval has no task {name!r}{hint}")


def run_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    manager: Any = None,
) -> dict[str, Any]:
    """Run lm-eval `tasks` on `model`; returns lm-eval's per-task metrics, shots and versions as plain JSON.

    `num_fewshot=None` keeps each task's own default; `seed` seeds lm-eval's python, numpy, torch and few-shot
    sampling alike.
    """
    if not tasks:
        raise SparseftError("no lm-eval task given; name one, e.g. --task lm-eval:hellaswag")
    manager = manager or task_manager()
    check_tasks(tasks, manager)
    try:
        results = _lm_eval().simple_evaluate(
            model=wrap(model, tokenizer, batch_size),
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except OSError as e:  # the hub (ConnectionError, HTTP errors, offline mode) or a missing data file
        reason = first_line(e)
        raise SparseftError(
            f"lm-eval could not load the data of {', '.join(tasks)} ({reason}); without network access, point a "
            "task YAML at local files and pass its folder with --lm-eval-include"
        ) from e
    if results is None:  # only on non-zero ranks of a multi-process run
        return {}
    kept = {
        key: results.get(key) for key in ("results", "n-shot", "versions", "n-samples", "lm_eval_version")
    }
    # numpy scalars and the odd callable in lm-eval's output: make it plain JSON.
    plain: dict[str, Any] = json.loads(
        json.dumps(kept, default=lambda v: v.item() if hasattr(v, "item") else str(v))
    )
    return plain
