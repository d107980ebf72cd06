"""A decoding step of Whisper's decoder layer as a few direct calls, on transformers' Whisper model (until the
runtime's own Whisper decoder replaces it, as runtime/models replaced this path for the Llama family).

Once the linears, norms and attention are ops, the Python around them is what a decoded token
costs outside the linears: a transformers decoder layer makes some fifteen module calls, passes its arguments
through deprecation decorators and runs every wrapper's checks. TinyLlama's shape with the linears stubbed out:
227 µs a layer, 5 ms a token. `fuse_layers_` gives each converted layer a forward that, for a decoding step (one
new token per sequence, no mask, a dynamic cache), calls the same ops on the same tensors in the same order
directly, and hands every other call to the layer's own forward. Decode steps alternated in one process on
TinyLlama's shape at 70%: int8 30.8-32.8 against 34.3-36.8 ms a token, bf16 48.2-51.6 against 51.7-55.3,
with bit-identical logits.

The step itself is in decode_whisper. A layer class takes its step only once one check on random input through both forwards has agreed bit
for bit, so a transformers release that changes the layer keeps its own forward rather than diverging. A layer in
training mode, or with one of the modules its step reads or skips in training mode, hooked, or replaced since,
keeps its own forward too (step_guard). The dynamic cache layers a step updates become `kv_cache.GrowingLayer`s,
which add a token without copying the cache.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from sparseft.runtime import decode_whisper, dispatch

_FAST: dict[type, type] = {}


def _fast(cls: type) -> type:
    """A subclass of a decoder-layer class whose forward takes the direct path where it applies; one per class."""
    if cls not in _FAST:

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            # training: dropout, and anything else that mode changes, is the layer's own forward's to apply
            out = None if self.training else self.__dict__["_decode_plan"].step(args, kwargs)
            return cls.forward(self, *args, **kwargs) if out is None else out  # type: ignore[attr-defined]

        _FAST[cls] = type(cls.__name__, (cls,), {"forward": forward, "__doc__": cls.__doc__})
    return _FAST[cls]


def fuse_layers_(model: nn.Module) -> int:
    """Give every converted Whisper decoder layer of `model` the direct decoding step;
    returns how many layers have it. Nothing changes where the AVX-512 kernels are not available."""
    if dispatch.best_isa() != "avx512":
        return 0
    checked: dict[type, bool] = {}
    count = 0
    for layer in model.modules():
        cls = type(layer)
        if cls in _FAST.values():
            count += 1
            continue
        plan = decode_whisper.plan(layer)
        if plan is None:
            continue
        if cls not in checked:  # the code is the class's: one layer of each class is enough to check it
            try:
                checked[cls] = plan.agrees(layer, model)
            except Exception:  # a layer whose forward no longer takes the check's call keeps that forward
                checked[cls] = False
        if checked[cls]:
            object.__setattr__(layer, "_decode_plan", plan)  # a plain attribute: no submodules registered
            layer.__class__ = _fast(cls)
            count += 1
    return count
