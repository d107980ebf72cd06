"""Rotary position embedding of the query and key in one C++ op (kernels/rotary.cpp).

transformers applies it with a module-level function, `apply_rotary_pos_emb(q, k, cos, sin)`: about sixteen small
torch ops per layer and token, 37-53 µs a call against 8-13 µs for the op. Forward passes of the 22-layer
TinyLlama-shaped model with its linears stubbed out, alternating with and without: 1.2-1.6 ms less a token (of
10-11 ms). The attention looks that function up in its modeling module at each call, so the
function is replaced there; the replacement takes the op only inside the attention modules of a model given to
`fuse_rotary_` (their class becomes a subclass that marks the call), so any other model of the same architecture in
the process, a dense baseline for one, keeps transformers' own ops. The op gives the same result bit for bit (it
rounds each product and the sum as torch does). It is used only where the modeling module's function is Llama's or
Phi-3's, text for text, and anything it does not cover (another device, dtype or layout; Phi-3's partial rotary,
where cos and sin are narrower than the head) goes to the original.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sparseft.runtime import dispatch

# Modeling modules whose apply_rotary_pos_emb the op computes. Phi-3's rotates the first cos.shape[-1] features
# of each head and passes the rest; where that is the whole head, it is Llama's.
_REFERENCES = ("transformers.models.llama.modeling_llama", "transformers.models.phi3.modeling_phi3")
_INSIDE = contextvars.ContextVar("sparseft_rotary", default=False)
# Above this many tokens a call (a prompt) goes to the original, which is vectorized and threaded: TinyLlama's
# heads, bf16, the op against the original: 13 against 70 us at 1 token, 78 against 115 at 16, 150 against 161
# at 32, 294 against 187 at 64, 1140 against 660 at 256. Both give the same bits, so only the time changes.
_OP_TOKENS = 32
_MARKED: dict[type, type] = {}


def _source(function: Any) -> str | None:
    function = getattr(function, "__wrapped__", function)
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return None


def _known_rotary(module: Any) -> bool:
    names = ("apply_rotary_pos_emb", "rotate_half")
    mine = [_source(getattr(module, name, None)) for name in names]
    if None in mine:
        return False
    return any(
        mine == [_source(getattr(importlib.import_module(reference), name)) for name in names]
        for reference in _REFERENCES
    )


def _covered(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """What the op takes: q, k (B, H, T, D) and cos, sin (B, T, D), one dtype (fp32 or bf16), on the CPU, unit
    last strides. Checked here rather than by catching the op's error, which would also hide a real one."""
    tensors = (q, k, cos, sin)
    return (
        q.dim() == k.dim() == 4
        and cos.dim() == 3
        and sin.shape == cos.shape
        and q.shape[0] == k.shape[0] == cos.shape[0]
        and q.shape[2] == k.shape[2] == cos.shape[1]
        and q.shape[3] == k.shape[3] == cos.shape[2]
        and q.shape[3] % 2 == 0
        and all(t.dtype == q.dtype and t.device.type == "cpu" and t.stride(-1) == 1 for t in tensors)
        and q.dtype in (torch.float32, torch.bfloat16)
        and dispatch.current_isa() != "torch"
    )


def fast_rotary(original: Callable[..., Any]) -> Callable[..., Any]:
    """`original` (Llama's or Phi-3's apply_rotary_pos_emb), run by the op inside a marked attention call."""

    @functools.wraps(original)
    def apply(
        q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
    ) -> Any:
        if _INSIDE.get() and unsqueeze_dim == 1 and _covered(q, k, cos, sin) and q.shape[2] <= _OP_TOKENS:
            return dispatch.rotary(q, k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim)

    apply.sparseft_rotary = True  # type: ignore[attr-defined]
    return apply


def _marked(cls: type) -> type:
    """A subclass of an attention class whose forward marks the call; one per class."""
    if cls not in _MARKED:

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            token = _INSIDE.set(True)
            try:
                return cls.forward(self, *args, **kwargs)  # type: ignore[attr-defined]
            finally:
                _INSIDE.reset(token)

        _MARKED[cls] = type(cls.__name__, (cls,), {"forward": forward, "__doc__": cls.__doc__})
    return _MARKED[cls]


def takes_op(module: nn.Module) -> bool:
    """Whether `module` is an attention module that `fuse_rotary_` gave the op."""
    return type(module) in _MARKED.values()


def fuse_rotary_(model: nn.Module) -> int:
    """Run the rotary embedding of `model`'s attention modules through the op; returns how many modules now do.
    Nothing changes where the C++ kernels could not be built or the modeling module's function is not Llama's or
    Phi-3's."""
    if dispatch.best_isa() == "torch":
        return 0
    module = sys.modules.get(type(model).__module__)
    current = getattr(module, "apply_rotary_pos_emb", None)
    if module is None or current is None or not _known_rotary(module):
        return 0
    if not getattr(current, "sparseft_rotary", False):
        module.apply_rotary_pos_emb = fast_rotary(current)  # type: ignore[attr-defined]
    calls_it: dict[type, bool] = {}  # per class: its forward's source is read once, not once per layer
    count = 0
    for sub in model.modules():
        cls = type(sub)
        if cls in _MARKED.values():
            count += 1
            continue
        if cls not in calls_it:
            source = _source(cls.forward) if cls.__module__ == module.__name__ else None
            calls_it[cls] = "apply_rotary_pos_emb(" in (source or "")
        if calls_it[cls]:
            sub.__class__ = _marked(cls)
            count += 1
    return count
