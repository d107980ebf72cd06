"""The own decoders' per-token ops: the C++ op where it covers the call gives the bits of the torch form the
transformers code uses, and everything else takes that torch form."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional

from sparseft.runtime import dispatch
from sparseft.runtime.models import ops

OP_ISAS = [isa for isa in ("avx2", "avx512") if isa in dispatch.available_isas()]


def _torch_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    inner = gate_up.shape[-1] // 2
    return functional.silu(gate_up[..., :inner]) * gate_up[..., inner:]


@pytest.mark.parametrize("isa", OP_ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 2 * 192), (3, 1, 2 * 64), (1, 5, 2 * 256)])
def test_silu_mul_op_gives_torchs_bits(
    isa: str, dtype: torch.dtype, shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPARSEFT_ISA", isa)
    # values across silu's range, including the large ones where exp overflows and the small ones where it is 1
    gate_up = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 8).to(dtype)
    gate_up.view(-1)[:4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])
    calls: list[int] = []
    real = dispatch.silu_mul
    monkeypatch.setattr(dispatch, "silu_mul", lambda x: calls.append(1) or real(x))
    got = ops.silu_mul(gate_up)
    assert calls == [1]
    assert torch.equal(got, _torch_silu_mul(gate_up))


@pytest.mark.parametrize("isa", OP_ISAS)
@pytest.mark.parametrize("inner", [1, 7, 33, 100])
def test_silu_mul_op_handles_every_row_length(isa: str, inner: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # the op itself on lengths the decoder does not send it (tails past the last full vector): within rounding
    monkeypatch.setenv("SPARSEFT_ISA", isa)
    gate_up = torch.randn(2, 2 * inner, generator=torch.Generator().manual_seed(inner))
    torch.testing.assert_close(dispatch.silu_mul(gate_up), _torch_silu_mul(gate_up))


@pytest.mark.parametrize("case", ["odd rows", "float16", "torch kernels", "large"])
def test_what_the_silu_mul_op_does_not_cover_takes_torch(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    inner = 96 if case == "odd rows" else 128
    rows = 400 if case == "large" else 2
    dtype = torch.float16 if case == "float16" else torch.bfloat16
    if case == "torch kernels":
        monkeypatch.setenv("SPARSEFT_ISA", "torch")
    gate_up = torch.randn(rows, 2 * inner).to(dtype)
    monkeypatch.setattr(dispatch, "silu_mul", lambda x: pytest.fail("the op was called"))
    assert torch.equal(ops.silu_mul(gate_up), _torch_silu_mul(gate_up))


def test_silu_mul_op_refuses_bad_input() -> None:
    if not OP_ISAS:
        pytest.skip("no AVX2 kernels here")
    with pytest.raises(RuntimeError, match="even last dimension"):
        dispatch.silu_mul(torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        dispatch.silu_mul(torch.randn(2, 4).half())
