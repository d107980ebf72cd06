"""Checkpoints of a fine-tuning stage: written atomically, read back whole before any of it is used, and resumed
from the newest one that reads back (a damaged one is named in a warning and the one before it tried).

A step is fully described by its number (see `sparseft.finetuning.loop`), so a checkpoint holds the step, the
weights, the optimizer, the schedule and the RNG, and the setup that gives step numbers their meaning (processes,
batch sizes, seed, data rows, schedule), which must be unchanged to resume.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate.utils import broadcast_object_list
from torch import nn

from sparseft.errors import SparseftError, SparseftWarning
from sparseft.finetuning.distributed import is_sharded, reduce_sum
from sparseft.finetuning.masks import local
from sparseft.io import atomic_dir, write_json

T = TypeVar("T")

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary directories start with a dot)."""
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.removeprefix("step-")))


def remove_temporaries(root: Path) -> None:
    """Remove what a save killed midway left under `root`: `.step-N.tmp-*` (never renamed into place) and
    `.step-N.old-*` (a replaced checkpoint not yet deleted)."""
    if root.is_dir():
        for path in [*root.glob(".step-*.tmp-*"), *root.glob(".step-*.old-*")]:
            shutil.rmtree(path, ignore_errors=True)


def check_setup(path: Path, saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Refuse to resume `path` under another setup: it would silently read other rows or follow another schedule.
    Checkpoints written before the setup was recorded (`saved` None) are not checked."""
    if saved is None:
        return
    for key, value in current.items():
        if key in saved and saved[key] != value:
            raise SparseftError(
                f"checkpoint {path} was written with {key} = {saved[key]} but this run has {value}; "
                f"set it back to {saved[key]} to resume, or start again in another --output"
            )


def save_checkpoint(
    accelerator: Any,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    root: Path,
    state: dict[str, Any],
    keep_last: int,
) -> None:
    """Write `root/step-N` atomically: weights (safetensors), optimizer + schedule + RNG (tensors only), and the
    trainer state (step, setup, expected zeros, history) as JSON; then drop all but the last `keep_last`.

    The optimizer state is written once when every process holds the same (DDP), and once per process when each
    holds its own shard (FSDP). Older checkpoints are deleted only once the new one is on disk (flushed, renamed,
    the rename flushed), so a crash or power loss at any point leaves a complete checkpoint to resume from."""
    weights = accelerator.get_state_dict(model)  # every process takes part (FSDP gathers the shards)
    main, sharded = accelerator.is_main_process, is_sharded(accelerator)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_dir(root / f"step-{state['step']}")) if main else None
        shared = [str(tmp) if tmp else None]
        if accelerator.num_processes > 1:
            broadcast_object_list(shared)
        where = Path(str(shared[0]))
        torch.save(_rng_state(), where / f"rng-{accelerator.process_index}.pt")
        if main or sharded:
            name = f"optimizer-{accelerator.process_index}.pt" if sharded else OPTIMIZER_FILE
            saved = {"optimizer": local_optimizer_state(optimizer), "scheduler": scheduler.state_dict()}
            torch.save(saved, where / name)
        if main:
            accelerator.unwrap_model(model).save_pretrained(
                where, state_dict=weights, safe_serialization=True
            )
            write_json(where / STATE_FILE, state)
        accelerator.wait_for_everyone()  # every process has written its files before atomic_dir flushes them
    if main:
        for old in checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


@dataclass
class Checkpoint:
    """A checkpoint read back whole, before anything of it is used."""

    path: Path
    model: nn.Module
    state: dict[str, Any]  # trainer_state.json
    saved: dict[str, Any]  # the optimizer and scheduler state dicts
    rng: dict[str, Any] | None


class _Damaged(Exception):
    """A file of a checkpoint does not read back (truncated, garbled, missing)."""


def read_checkpoint(
    path: Path, process_index: int, setup: dict[str, Any], load_weights: Callable[[str], nn.Module]
) -> Checkpoint:
    """Read what this process needs from `path`. Raises `_Damaged` when a file does not read back, and
    SparseftError when the checkpoint was written under another setup (checked first: a changed number of
    processes would otherwise show as a missing optimizer file)."""
    state = _reading(STATE_FILE, lambda: json.loads((path / STATE_FILE).read_text()))
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise _Damaged(f"{STATE_FILE}: no step in it")
    check_setup(path, state.get("setup"), setup)
    own = path / f"optimizer-{process_index}.pt"
    optimizer_file = own if own.is_file() else path / OPTIMIZER_FILE
    rng_file = path / f"rng-{process_index}.pt"
    model = _reading("weights", lambda: load_weights(str(path)))
    # weights_only: tensors and plain containers, no pickled code
    saved = _reading(optimizer_file.name, lambda: torch.load(optimizer_file, weights_only=True))
    rng = None
    if rng_file.is_file():
        rng = _reading(rng_file.name, lambda: torch.load(rng_file, weights_only=True))
    return Checkpoint(path, model, state, saved, rng)


def latest_checkpoint(
    accelerator: Any, root: Path, setup: dict[str, Any], load_weights: Callable[[str], nn.Module]
) -> Checkpoint | None:
    """The newest checkpoint under `root` that reads back on every process, or None if there is none. A damaged
    one is named in a warning and the one before it is tried."""
    found = checkpoints(root)
    for path in reversed(found):
        checkpoint, problem = None, None
        try:
            checkpoint = read_checkpoint(path, accelerator.process_index, setup, load_weights)
        except _Damaged as e:
            problem = str(e)
        if reduce_sum(accelerator, int(problem is not None)) == 0:  # all processes resume from the same step
            return checkpoint
        if problem is not None:
            then = "; trying the one before it" if path != found[0] else ""
            warnings.warn(
                f"checkpoint {path} cannot be loaded ({problem}){then}", SparseftWarning, stacklevel=2
            )
    if found:
        raise SparseftError(
            f"no checkpoint in {root} can be loaded (see the warnings above); remove that directory to start the "
            "stage again"
        )
    return None


def restore(checkpoint: Checkpoint, optimizer: Any, scheduler: Any) -> None:
    """Put the optimizer, schedule and RNG of `checkpoint` in place (its weights are already the model's)."""
    # popped, so that the copy read from disk is freed once the optimizer holds the state
    load_local_optimizer_state(optimizer, checkpoint.saved.pop("optimizer"))
    scheduler.load_state_dict(checkpoint.saved.pop("scheduler"))
    if checkpoint.rng is not None:
        _set_rng_state(checkpoint.rng)


def _reading(name: str, read: Callable[[], T]) -> T:
    try:
        return read()
    except Exception as e:  # a damaged file fails in many ways: JSON, unpickling, zip, safetensors, EOF
        reason, text = type(e).__name__, str(e).strip()
        if text:  # the first sentence: torch appends paragraphs of advice
            reason += ": " + text.splitlines()[0].split(". ")[0]
        raise _Damaged(f"{name}: {reason}") from e


def local_optimizer_state(optimizer: Any) -> dict[str, Any]:
    """The optimizer's state dict with sharded (DTensor) entries replaced by this process's shard, so that it
    holds plain tensors only and reads back with `torch.load(weights_only=True)`."""
    saved = optimizer.state_dict()
    saved["state"] = {i: {k: local(v) for k, v in entry.items()} for i, entry in saved["state"].items()}
    return saved


def load_local_optimizer_state(optimizer: Any, saved: dict[str, Any]) -> None:
    """Inverse of `local_optimizer_state`: shards go back into DTensors laid out like their parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in saved["state"].items():
        param = params[int(index)]
        mesh = getattr(param, "device_mesh", None)
        if mesh is None:
            continue
        from torch.distributed.tensor import DTensor  # imported under FSDP only: slow to import

        for key, value in entry.items():
            if value.shape == local(param.data).shape and value.ndim > 0:
                entry[key] = DTensor.from_local(
                    value, mesh, param.placements, shape=param.shape, stride=param.stride()
                )
    optimizer.load_state_dict(saved)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
