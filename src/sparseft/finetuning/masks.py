"""Keeping pruned weights at exactly zero while training.

A mask is a bool tensor per pruned weight, True where the weight is kept, read from the pruned weights
themselves. Each optimizer step: gradients of pruned entries are zeroed (before clipping, so they do not count in
the norm, and before the optimizer, so Adam's moments stay zero there), and after the step the weights are
multiplied by the mask again, which also undoes anything weight decay or a non-zero moment could leave.

The masks are taken from the parameters the optimizer actually holds, after `accelerator.prepare`, and from the
data each process actually owns: under DDP that is the full weight, under FSDP2 the local shard of a DTensor.
Masks made before wrapping would act on stale copies under FSDP and silently do nothing, so `SparseMasks.build`
checks that the masks it made cover exactly as many zeros as the pruned model had before wrapping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparseft.errors import SparseftError
from sparseft.hf import is_linear

# Segments that DDP, FSDP and activation checkpointing insert into parameter names.
_WRAPPER_PARTS = ("module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def plain_name(name: str) -> str:
    """A parameter name with wrapper segments removed, as the unwrapped model names it."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a (possibly DTensor-sharded) tensor stored in this process; shares its storage."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def pruned_weights(model: nn.Module) -> dict[str, int]:
    """Names of the linear weights that hold zeros, with their zero counts (on the unwrapped model).

    Any zero marks a weight as pruned: a dense trained weight has essentially none, and freezing a stray exact
    zero costs nothing.
    """
    found = {}
    for module_name, module in model.named_modules():
        if is_linear(module):
            zeros = int((module.weight == 0).sum().item())
            if zeros:
                found[f"{module_name}.weight" if module_name else "weight"] = zeros
    return found


@dataclass
class SparseMasks:
    names: list[str]
    params: list[nn.Parameter]
    keep: list[torch.Tensor]  # bool, shaped like the local part of each parameter

    @classmethod
    def build(
        cls, model: nn.Module, optimizer: torch.optim.Optimizer, expected: dict[str, int], sharded: bool
    ) -> SparseMasks:
        """Masks for the parameters named in `expected` (from `pruned_weights` before wrapping), found among the
        optimizer's parameters. `sharded` (FSDP): each process holds a part, so zero counts add up across
        processes; the caller compares `zeros()` with the expected total."""
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        # Every name of a shared parameter: a tied LM head (Whisper's proj_out) is named only by its embedding.
        by_name = {plain_name(n): p for n, p in model.named_parameters(remove_duplicate=False)}
        names, params, keep = [], [], []
        for name in expected:
            param = by_name.get(name)
            if param is None or id(param) not in in_optimizer:
                raise SparseftError(
                    f"pruned weight {name} is not among the optimizer's parameters; masks would act on a stale copy "
                    "(build the optimizer from the prepared model)"
                )
            names.append(name)
            params.append(param)
            keep.append(local(param.data) != 0)
        masks = cls(names, params, keep)
        if not sharded:
            for name, mask in zip(names, keep, strict=True):
                if int((~mask).sum()) != expected[name]:
                    raise SparseftError(f"the mask of {name} does not match its pruned weight")
        return masks

    def zero_grads(self) -> None:
        for param, mask in zip(self.params, self.keep, strict=True):
            if param.grad is not None:
                local(param.grad).mul_(mask)

    @torch.no_grad()
    def apply(self) -> None:
        for param, mask in zip(self.params, self.keep, strict=True):
            local(param.data).mul_(mask)

    def zeros(self) -> int:
        """Pruned entries in this process's masks."""
        return sum(int((~m).sum()) for m in self.keep)

    @torch.no_grad()
    def violations(self) -> int:
        """Pruned entries that are not exactly zero in this process (should always be 0)."""
        return sum(int((local(p.data)[~m] != 0).sum()) for p, m in zip(self.params, self.keep, strict=True))
