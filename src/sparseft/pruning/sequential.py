"""The sequential calibration driver: prune a model block by block.

Calibration samples run through the model up to the first transformer block, where their hidden states are
caught (for an encoder-decoder: the encoder's blocks first, then the decoder's, recorded through the pruned
encoder). Then, for each block in turn: hooks collect statistics of its targets' inputs, the targets are pruned, and
the block is run again so that the next block sees the outputs of the *pruned* block. Only the current block needs
to be on the compute device, and only its statistics are in memory.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from sparseft.errors import SparseftError
from sparseft.hf import find_block_lists, weight_matrix
from sparseft.pruning.magnitude import magnitude_prune
from sparseft.pruning.masks import NM
from sparseft.pruning.obs import DEFAULT_BLOCK_SIZE, DEFAULT_DAMPENING, Hessian
from sparseft.pruning.sparsegpt import sparsegpt_prune
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


def prune_layer(
    module: nn.Module, settings: PruneSettings, stats: Hessian | InputNorms | None, name: str = "layer"
) -> None:
    """Prune one linear layer in place, from the statistics of its inputs (none for magnitude). `name` is
    the layer's name in error messages."""
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
            layer=name,
        )
    weight.copy_(new)


Stats = Hessian | InputNorms


def calibrate_and_prune(
    modules: dict[str, nn.Module], run: Callable[[], None], settings: PruneSettings
) -> None:
    """Run `run()` with hooks that gather input statistics of `modules`, then prune each of them."""
    stats = calibrate(modules, run, Hessian if settings.method == "sparsegpt" else InputNorms)
    for name, module in modules.items():
        prune_layer(module, settings, stats[name], name)


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
        if name not in leader_of:  # e.g. a mixture-of-experts expert that no calibration token was routed to
            raise SparseftError(
                f"layer {name} saw no calibration tokens, so it cannot be calibrated from data; leave it dense "
                f"with --ignore {name}, or calibrate on more samples (--num-samples)"
            )
    return {name: stats[leader_of[name]] for name in modules}


ModelInputs = dict[str, torch.Tensor]
# The arguments a block is called with besides its hidden states: (positional args, keyword args).
Call = tuple[tuple[Any, ...], dict[str, Any]]


def as_model_inputs(samples: torch.Tensor | list[ModelInputs]) -> list[ModelInputs]:
    """Token windows (num_samples, seqlen) become one `input_ids` batch each; dicts (encoder-decoder inputs
    such as input_ids + decoder_input_ids, or Whisper's input_features) pass through."""
    if isinstance(samples, torch.Tensor):
        return [{"input_ids": row.unsqueeze(0)} for row in samples]
    return list(samples)


def _forward(model: nn.Module, inputs: ModelInputs, device: torch.device | str) -> Any:
    return model(**{k: v.to(device) for k, v in inputs.items()}, use_cache=False)


def _move_outside(model: nn.Module, skip_prefix: str, device: torch.device | str) -> None:
    """Move every parameter and buffer that is not inside the block list `skip_prefix` to `device`."""
    for name, module in model.named_modules():
        if name == skip_prefix or name.startswith(skip_prefix + "."):
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.to(device)
        for key, buf in list(module.named_buffers(recurse=False)):
            module._buffers[key] = buf.to(device)


def _share(value: Any, reference: Any) -> Any:
    """`reference` when it holds the same tensors as `value`, so that identical masks and position tables of
    many samples take memory once."""
    if isinstance(value, torch.Tensor) and isinstance(reference, torch.Tensor):
        same = (
            value.shape == reference.shape
            and value.dtype == reference.dtype
            and torch.equal(value, reference)
        )
        return reference if same else value
    if isinstance(value, tuple) and isinstance(reference, tuple) and len(value) == len(reference):
        shared = tuple(_share(v, r) for v, r in zip(value, reference, strict=True))
        return reference if all(a is b for a, b in zip(shared, reference, strict=True)) else shared
    return value


def _record_stack_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    inputs: list[ModelInputs],
    device: torch.device | str,
    every_block: bool,
) -> tuple[list[torch.Tensor], list[list[Call]]]:
    """The first block's hidden input for every sample, and the call of each block (`calls[sample][block]`).

    Decoder-only stacks call every block with the same masks and position tables, so the forward pass stops
    at the first block and `calls[sample]` holds that one call. Encoder-decoder stacks hand later blocks other
    arguments (T5's first block computes the position bias the others reuse; decoder blocks read the encoder's
    output), so with `every_block` each sample runs through the whole stack and every block's call is kept.
    """
    hidden: list[torch.Tensor] = []
    calls: list[list[Call]] = []
    current: list[Call] = []

    def make_hook(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            kwargs = dict(kwargs)
            x = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                hidden.append(x.detach())
            current.append((args[1:], kwargs))
            if not every_block or index == len(blocks) - 1:
                raise _CaughtInputs

        return hook

    handles = [b.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for sample in inputs:
            with contextlib.suppress(_CaughtInputs):
                _forward(model, sample, device)
            if calls:
                current[:] = [
                    (_share(args, ref[0]), {k: _share(v, ref[1].get(k)) for k, v in kwargs.items()})
                    for (args, kwargs), ref in zip(current, calls[0], strict=True)
                ]
            calls.append(list(current))
            current.clear()
    finally:
        for handle in handles:
            handle.remove()
    return hidden, calls


@torch.no_grad()
def prune_model(
    model: nn.Module,
    targets: dict[str, nn.Module],
    settings: PruneSettings,
    samples: torch.Tensor | list[ModelInputs] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> None:
    """Prune `targets` of `model` in place. `samples` ((num_samples, seqlen) token ids, or a list of model
    input dicts for encoder-decoder models) are needed unless the method is magnitude. The model is expected on the CPU; each block visits `device` in turn."""
    if settings.method == "magnitude":
        for module in tqdm(targets.values(), desc="magnitude", disable=not progress):
            prune_layer(module, settings, None)
        return
    if samples is None:
        raise ValueError(f"{settings.method} needs calibration samples")

    def prune_group(modules: dict[str, nn.Module], run: Callable[[], None]) -> None:
        calibrate_and_prune(modules, run, settings)

    run_sequential(model, targets, samples, prune_group, device, progress, desc=f"{settings.method} blocks")


def _call_block(
    block: nn.Module, index: int, hidden: list[torch.Tensor], calls: list[list[Call]], i: int
) -> Any:
    args, kwargs = calls[i][min(index, len(calls[i]) - 1)]
    out = block(hidden[i], *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _feed_block(block: nn.Module, index: int, hidden: list[torch.Tensor], calls: list[list[Call]]) -> None:
    for i in range(len(hidden)):
        _call_block(block, index, hidden, calls, i)


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    targets: dict[str, nn.Module],
    samples: torch.Tensor | list[ModelInputs],
    act: Callable[[dict[str, nn.Module], Callable[[], None]], None],
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "blocks",
) -> None:
    """The block-by-block driver: for each block, `act(targets_in_block, run)` may call `run()` (which feeds
    the block its calibration inputs) and must leave the targets updated; the block's outputs are then
    recomputed for the next block. Pruning and GPTQ quantization both act through this.

    Stacks are handled in order (an encoder before its decoder), each from inputs recorded through the
    model as already processed, so a decoder's cross-attention is calibrated on the pruned encoder's output.
    """
    inputs = as_model_inputs(samples)
    stacks = find_block_lists(model)
    if len(stacks) > 1:
        model.to(device)  # encoder-decoder models are recorded whole; they are small
    try:
        for prefix, blocks in stacks:
            if not any(n.startswith(prefix + ".") for n in targets):
                continue
            _move_outside(model, prefix, device)
            hidden, calls = _record_stack_inputs(model, blocks, inputs, device, every_block=len(stacks) > 1)
            for index, block in enumerate(tqdm(blocks, desc=f"{desc} ({prefix})", disable=not progress)):
                block.to(device)
                inside = {n: m for n, m in targets.items() if n.startswith(f"{prefix}.{index}.")}

                if inside:
                    act(inside, functools.partial(_feed_block, block, index, hidden, calls))
                hidden[:] = [_call_block(block, index, hidden, calls, i) for i in range(len(hidden))]
                if len(stacks) == 1:
                    block.to("cpu")
        in_stacks = tuple(prefix + "." for prefix, _ in stacks)
        outside = {n: m for n, m in targets.items() if not n.startswith(in_stacks)}
        if outside:
            # Targets outside the blocks (an LM head, say) see the fully pruned model in one ordinary pass.
            model.to(device)

            def run_model() -> None:
                for sample in inputs:
                    _forward(model, sample, device)

            act(outside, run_model)
    finally:
        model.to("cpu")
