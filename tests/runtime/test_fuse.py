"""Fused q/k/v and gate/up groups compute what the separate linears did, in fewer kernel calls."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from sparseft.runtime import dispatch, sparsify_
from sparseft.runtime.fuse import Slice, Stacked, fuse_siblings_
from sparseft.runtime.linear import SparseLinear

PROMPT = torch.tensor([[5, 17, 250, 3, 99, 42, 7]])


def _count_kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    linear = dispatch.linear

    def counted(*args: object) -> torch.Tensor:
        calls[0] += 1
        return linear(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(dispatch, "linear", counted)
    return calls


@torch.inference_mode()
def _greedy(model: nn.Module) -> list[int]:
    out = model.generate(PROMPT, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    return out[0, PROMPT.shape[1] :].tolist()


def test_fused_model_decodes_like_unfused_with_fewer_calls(
    monkeypatch: pytest.MonkeyPatch, pruned_model: Callable[..., nn.Module]
) -> None:
    dense = pruned_model()
    separate, fused = copy.deepcopy(dense), copy.deepcopy(dense)
    sparsify_(separate, fuse=False)
    summary = sparsify_(fused)
    layers = dense.config.num_hidden_layers
    assert summary["fused_groups"] == 2 * layers
    attn = fused.model.layers[0].self_attn
    assert all(isinstance(getattr(attn, n), Slice) for n in ("q_proj", "k_proj", "v_proj"))
    assert attn.q_proj.stacked is attn.v_proj.stacked
    assert attn.k_proj.out_features == dense.model.layers[0].self_attn.k_proj.out_features
    assert attn.q_proj.kind == "bf16" and 0.25 < attn.k_proj.density() < 0.35
    assert _greedy(fused) == _greedy(separate) == _greedy(dense)

    calls = _count_kernel_calls(monkeypatch)
    with torch.inference_mode():
        fused(PROMPT[:, :1])
    assert calls[0] == 4 * layers  # q/k/v, o, gate/up, down
    memos = [m._memo for m in fused.modules() if isinstance(m, Stacked)]
    assert len(memos) == 2 * layers
    assert all(m.x is None and m.y is None for m in memos)  # nothing kept once every member is served
    calls[0] = 0
    with torch.inference_mode():
        separate(PROMPT[:, :1])
    assert calls[0] == 7 * layers


def test_members_on_different_inputs_are_each_computed(pruned_model: Callable[..., nn.Module]) -> None:
    dense = pruned_model()
    attn = dense.model.layers[0].self_attn
    reference = {n: copy.deepcopy(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj")}
    sparsify_(dense)
    a, b = torch.randn(2, 3, 96, dtype=torch.bfloat16).unbind(0)
    fused = dense.model.layers[0].self_attn
    for name, x in (("q_proj", a), ("k_proj", b), ("v_proj", b), ("q_proj", b)):
        torch.testing.assert_close(getattr(fused, name)(x), reference[name](x), rtol=2e-2, atol=2e-2)
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    first = fused.q_proj(x).clone()
    x.mul_(2)  # changed in place: the remembered output no longer holds
    torch.testing.assert_close(fused.k_proj(x), reference["k_proj"](x), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fused.q_proj(x), 2 * first, rtol=2e-2, atol=2e-2)


def _attention(kinds: tuple[str, str, str]) -> nn.Module:
    block = nn.Module()
    for name, kind in zip(("q_proj", "k_proj", "v_proj"), kinds, strict=True):
        linear = nn.Linear(64, 32, bias=False)
        setattr(block, name, SparseLinear.from_linear(linear, kind))  # type: ignore[arg-type]
    return block


def test_only_like_self_attention_groups_are_fused() -> None:
    model = nn.Module()
    model.self_attn = _attention(("bf16", "bf16", "int8"))  # mixed value kinds
    model.encoder_attn = _attention(("bf16",) * 3)  # a cross-attention reads two inputs
    assert fuse_siblings_(model) == 0
    model.self_attn = _attention(("int8",) * 3)
    assert fuse_siblings_(model) == 1
    assert model.self_attn.v_proj.kind == "int8"


def test_a_member_without_a_bias_fuses_with_those_that_have_one() -> None:
    # Whisper's self-attention: q and v have a bias, k has none
    torch.manual_seed(0)
    model = nn.Module()
    model.self_attn = nn.Module()
    originals = {}
    for name, bias in (("q_proj", True), ("k_proj", False), ("v_proj", True)):
        linear = nn.Linear(64, 32, bias=bias)
        originals[name] = SparseLinear.from_linear(linear, "bf16")  # type: ignore[arg-type]
        setattr(model.self_attn, name, copy.deepcopy(originals[name]))
    assert fuse_siblings_(model) == 1
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    for name, original in originals.items():
        assert torch.equal(getattr(model.self_attn, name)(x), original(x))
