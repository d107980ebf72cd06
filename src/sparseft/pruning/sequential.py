"""The sequential calibration driver: prune a model block by block.

Calibration samples run through the model up to the first transformer block, where their hidden states are
caught. Then, for each block in turn: hooks collect statistics of its targets' inputs, the targets are pruned, and
the block is run again so that the next block sees the outputs of the *pruned* block. Only the current block needs
to be on the compute device, and only its statistics are in memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from sparseft.models import find_blocks, weight_matrix
from sparseft.pruning.magnitude import magnitude_prune
from sparseft.pruning.masks import NM
from sparseft.pruning.sparsegpt import DEFAULT_BLOCK_SIZE, DEFAULT_DAMPENING, Hessian, sparsegpt_prune
from sparseft.pruning.wanda import InputNorms, wanda_prune

Method = Literal["magnitude", "wanda", "sparsegpt"]
METHODS: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True)
class PruneSettings:
    method: Method
    sparsity: float
    structure: NM | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    dampening: float = DEFAULT_DAMPENING


class _CaughtInputs(Exception):
    """Raised by the hook on the first block to stop the forward pass once its inputs are caught."""


def prune_layer(module: nn.Module, settings: PruneSettings, stats: Hessian | InputNorms | None) -> None:
    """Prune one linear layer in place, from the statistics of its inputs (none for magnitude)."""
    weight = weight_matrix(module)
    if settings.method == "magnitude":
        new = magnitude_prune(weight, settings.sparsity, settings.structure)
    elif settings.method == "wanda":
        assert isinstance(stats, InputNorms)
        new = wanda_prune(weight, stats, settings.sparsity, settings.structure)
    else:
        assert isinstance(stats, Hessian)
        new = sparsegpt_prune(
            weight,
            stats.matrix,
            settings.sparsity,
            settings.structure,
            settings.block_size,
            settings.dampening,
        )
    weight.copy_(new)


Stats = Hessian | InputNorms


def calibrate_and_prune(
    modules: dict[str, nn.Module], run: Callable[[], None], settings: PruneSettings
) -> None:
    """Run `run()` with hooks that gather input statistics of `modules`, then prune each of them."""
    stats = calibrate(modules, run, Hessian if settings.method == "sparsegpt" else InputNorms)
    for name, module in modules.items():
        prune_layer(module, settings, stats[name])


def calibrate(
    modules: dict[str, nn.Module], run: Callable[[], None], make_stats: Callable[[int, torch.device], Stats]
) -> dict[str, Stats]:
    """Run `run()` with hooks that feed each module's inputs to `make_stats(columns, device)`; return the
    statistics of every module (GPTQ quantization uses this with Hessians, as SparseGPT does).

    Layers that read the very same input tensor (q/k/v, gate/up) share one set of statistics: the first of
    them to see a tensor becomes its group's leader, and only the leader accumulates.
    """
    device = weight_matrix(next(iter(modules.values()))).device
    stats: dict[str, Stats] = {}
    leader_of: dict[str, str] = {}
    # Inputs seen on the first pass are kept alive so their addresses cannot be reused by another tensor.
    first_seen: list[tuple[torch.Tensor, str]] = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            x = inputs[0].detach()
            if name not in leader_of:
                same = [n for t, n in first_seen if t.data_ptr() == x.data_ptr() and t.shape == x.shape]
                leader_of[name] = same[0] if same else name
                first_seen.append((x, name))
            if leader_of[name] != name:
                return
            if name not in stats:
                stats[name] = make_stats(x.shape[-1], device)
            stats[name].add_batch(x)

        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in modules.items()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
        first_seen.clear()
    for name in modules:
        if name not in leader_of:
            raise RuntimeError(
                f"layer {name} was never called during calibration; it cannot be pruned from data"
            )
    return {name: stats[leader_of[name]] for name in modules}


def _move_outside(model: nn.Module, skip_prefix: str, device: torch.device | str) -> None:
    """Move every parameter and buffer that is not inside the block list `skip_prefix` to `device`."""
    for name, module in model.named_modules():
        if name == skip_prefix or name.startswith(skip_prefix + "."):
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.to(device)
        for key, buf in list(module.named_buffers(recurse=False)):
            module._buffers[key] = buf.to(device)


def _catch_block_inputs(
    model: nn.Module, first_block: nn.Module, samples: torch.Tensor, device: torch.device | str
) -> tuple[list[torch.Tensor], tuple[Any, ...], dict[str, Any]]:
    hidden: list[torch.Tensor] = []
    extra: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        x = args[0] if args else kwargs.pop("hidden_states")
        hidden.append(x.detach())
        if not extra:  # every window has the same length, so masks and positions are the same for all
            extra["args"], extra["kwargs"] = args[1:], kwargs
        raise _CaughtInputs

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for sample in samples:
            with contextlib.suppress(_CaughtInputs):
                model(input_ids=sample.unsqueeze(0).to(device), use_cache=False)
    finally:
        handle.remove()
    return hidden, extra["args"], extra["kwargs"]


@torch.no_grad()
def prune_model(
    model: nn.Module,
    targets: dict[str, nn.Module],
    settings: PruneSettings,
    samples: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> None:
    """Prune `targets` of `model` in place. `samples` (num_samples, seqlen) token ids are needed unless the
    method is magnitude. The model is expected on the CPU; each block visits `device` in turn."""
    if settings.method == "magnitude":
        for module in tqdm(targets.values(), desc="magnitude", disable=not progress):
            prune_layer(module, settings, None)
        return
    if samples is None:
        raise ValueError(f"{settings.method} needs calibration samples")

    def prune_group(modules: dict[str, nn.Module], run: Callable[[], None]) -> None:
        calibrate_and_prune(modules, run, settings)

    run_sequential(model, targets, samples, prune_group, device, progress, desc=f"{settings.method} blocks")


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    targets: dict[str, nn.Module],
    samples: torch.Tensor,
    act: Callable[[dict[str, nn.Module], Callable[[], None]], None],
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "blocks",
) -> None:
    """The block-by-block driver: for each block, `act(targets_in_block, run)` may call `run()` (which feeds
    the block its calibration inputs) and must leave the targets updated; the block's outputs are then
    recomputed for the next block. Pruning and GPTQ quantization both act through this."""
    prefix, blocks = find_blocks(model)
    _move_outside(model, prefix, device)
    try:
        hidden, args, kwargs = _catch_block_inputs(model, blocks[0], samples, device)
        for index, block in enumerate(tqdm(blocks, desc=desc, disable=not progress)):
            block.to(device)
            inside = {n: m for n, m in targets.items() if n.startswith(f"{prefix}.{index}.")}

            def run_block(block: nn.Module = block) -> None:
                for x in hidden:
                    block(x, *args, **kwargs)

            if inside:
                act(inside, run_block)
            for i, x in enumerate(hidden):
                out = block(x, *args, **kwargs)
                hidden[i] = out[0] if isinstance(out, tuple) else out
            block.to("cpu")
        outside = {n: m for n, m in targets.items() if not n.startswith(prefix + ".")}
        if outside:
            # Targets outside the blocks (an LM head, say) see the fully pruned model in one ordinary pass.
            model.to(device)

            def run_model() -> None:
                for sample in samples:
                    model(input_ids=sample.unsqueeze(0).to(device), use_cache=False)

            act(outside, run_model)
    finally:
        model.to("cpu")
