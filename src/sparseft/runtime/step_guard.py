"""What the direct decoding step (decode_whisper) checks before it skips a layer's own forward:
that the modules it reads are still the ones it planned with, none of them is in training mode (dropout) and
nothing hooks into them, and that the cache layer it updates is one it knows."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from sparseft.runtime.kv_cache import GrowingLayer

# (parent, name, module): where a step's module sits, to see whether it was replaced since
Places = tuple[tuple[nn.Module, str, nn.Module], ...]

CACHE_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer, GrowingLayer)


def places(*groups: tuple[nn.Module, tuple[str, ...]]) -> Places:
    """The places of each named child (the ones that exist) of each parent."""
    return tuple(
        (parent, name, getattr(parent, name))
        for parent, names in groups
        for name in names
        if getattr(parent, name, None) is not None
    )


def _harmless(hook: Any) -> bool:
    # transformers' own output capture puts a hook on every attention module the first time a call asks for
    # attentions or hidden states, and leaves it there. On the attention it records the attention weights, which
    # the decoding attention op never returns (the hook then records nothing), so skipping it changes nothing.
    return getattr(hook, "__name__", None) == "output_capturing_hook" and getattr(
        hook, "__module__", ""
    ).startswith("transformers.")


def changed(planned: Places) -> bool:
    """Whether a module of the plan was replaced or put in training mode (Monte-Carlo dropout puts only the
    dropouts or attentions back in it), or something hooks into the modules a step skips."""
    hooks = nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return True
    for parent, name, module in planned:
        if parent._modules.get(name) is not module or module.training or module._forward_pre_hooks:
            return True
        if module._forward_hooks and not all(_harmless(h) for h in module._forward_hooks.values()):
            return True
    return False


def known_layer(layers: Any, index: int) -> bool:
    return layers is not None and len(layers) > index and type(layers[index]) in CACHE_LAYERS


def grow_(layers: Any, index: int) -> None:
    """Make a dynamic cache layer add tokens in place instead of concatenating (kv_cache)."""
    if type(layers[index]) is DynamicLayer:
        layers[index].__class__ = GrowingLayer


@contextmanager
def evaluating(layer: nn.Module) -> Iterator[None]:
    """`layer` in eval mode for a check, each of its modules back in its own mode afterwards: a model converted
    in training mode still gets the direct step once it is put in eval mode."""
    modes = [(m, m.training) for m in layer.modules()]
    layer.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode
