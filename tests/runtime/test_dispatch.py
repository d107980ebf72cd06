"""Every kernel path agrees with its plain-torch reference: each instruction-set level this CPU has, forced (the
AMX kernels take batches of 2 (bf16) or 5 (int8) and more at the AVX-512 level); bf16, int8 and int4 values (groups
of 32, 64 and 128 columns); batch 1..130 (the AMX kernels take 64 a pass); odd sizes; empty and fully dense rows;
one and several threads."""

from __future__ import annotations

import copy
import platform
from collections.abc import Callable

import pytest
import torch

from sparseft.errors import SparseftError
from sparseft.runtime import SparseLinear, dispatch, reference, sparsify_
from sparseft.runtime.packing import Packed, bitmask_of, pack_bitmask, pack_dense

KERNEL_ISAS = [name for name in dispatch.available_isas() if name != "torch"]
# Each level, and where AMX takes batches of 2 and more, AVX-512 with it turned off: its expand kernels' batch tiles.
LEVELS = [(isa, False) for isa in KERNEL_ISAS]
if "avx512" in KERNEL_ISAS and dispatch.amx_ready("avx512"):
    LEVELS.append(("avx512", True))
SHAPES = [(1, 1), (5, 31), (37, 100), (64, 64), (70, 130), (33, 257)]
BATCHES = [1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 17, 32, 40, 50, 65, 130]


def _assert_close(y: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, kind: str) -> None:
    """`bound` is |x| . |W|^T, the scale of the rounding error of a dot product."""
    assert y.dtype == ref.dtype and y.shape == ref.shape
    # int8 sums are exact integers, only the final scaling rounds; int4 adds one fp32 rounding per group of columns
    rel = {"int8": 1e-6, "int4": 1e-5}.get(kind, 1e-4)
    tol = rel * bound + 1e-6
    if y.dtype == torch.bfloat16:  # both sides round to bf16 last: one bf16 step apart at most
        tol = tol + ref.float().abs() * 2**-7
    err = (y.float() - ref.float()).abs()
    assert bool((err <= tol).all()), f"max error {err.max().item()} (tolerance {tol.max().item()})"


@pytest.mark.skipif(not KERNEL_ISAS, reason="the C++ kernels are not built here")
@pytest.mark.parametrize(("isa", "amx_off"), LEVELS)
@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_mm_matches_reference(
    isa: str,
    kind: str,
    shape: tuple[int, int],
    amx_off: bool,
    awkward_weight: Callable[..., torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if amx_off:
        monkeypatch.setenv("SPARSEFT_AMX", "0")
    rows, cols = shape
    weight = awkward_weight(rows, cols)
    packed = pack_dense(weight, kind)  # type: ignore[arg-type]
    bound_w = reference.unpack(packed).abs().T
    g = torch.Generator().manual_seed(1)
    for batch in BATCHES:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(batch, cols, generator=g).to(dtype)
            bias = torch.randn(rows, generator=g) if batch % 2 else None
            y = dispatch.sparse_mm(x, packed, bias, isa)
            ref = reference.sparse_mm(x, packed, bias)
            _assert_close(y, ref, x.float().abs() @ bound_w * (1 + 1 / 64), kind)


@pytest.mark.skipif("avx512" not in KERNEL_ISAS, reason="no AVX-512 here")
@pytest.mark.parametrize("fma", [True, False], ids=["fma", "vdpbf16ps"])
def test_bf16_small_batch_tiles_match_reference_either_way(
    fma: bool, awkward_weight: Callable[..., torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    # tiles of up to 4 batch rows multiply in fp32 FMAs on Intel and with vdpbf16ps elsewhere: both, on any CPU
    monkeypatch.setenv("SPARSEFT_AMX", "0")
    set_tiles = dispatch.extension().bf16_fma_tiles
    assert set_tiles(int(fma)) == fma
    try:
        g = torch.Generator().manual_seed(2)
        for rows, cols in SHAPES:
            packed = pack_dense(awkward_weight(rows, cols), "bf16")
            for batch in (1, 2, 4, 9, 12):
                x = torch.randn(batch, cols, generator=g)
                y, ref = dispatch.sparse_mm(x, packed, None, "avx512"), reference.sparse_mm(x, packed, None)
                bound = x.abs() @ reference.unpack(packed).abs().T
                _assert_close(y, ref, bound * (1 + 1 / 64), "bf16")
    finally:
        set_tiles(-1)


@pytest.mark.skipif(not KERNEL_ISAS or not dispatch.amx_ready(), reason="no AMX here")
def test_batches_run_on_amx(
    monkeypatch: pytest.MonkeyPatch, awkward_weight: Callable[..., torch.Tensor]
) -> None:
    weight = awkward_weight(70, 1000)
    x = torch.randn(16, 1000)
    bf16, int8 = pack_dense(weight, "bf16"), pack_dense(weight, "int8")
    bias = torch.randn(70)
    amx = [dispatch.sparse_mm(x, p, bias, "avx512") for p in (bf16, int8)]
    assert dispatch.dense_above("bf16") == dispatch.AMX_DENSE_ABOVE["bf16"]
    # int8 from 33 tokens on: 16-bit activations on AMX, not decompressed
    assert dispatch.dense_above("int8") == dispatch.AMX_DENSE_ABOVE["int8"]
    monkeypatch.setenv("SPARSEFT_AMX", "0")
    assert not dispatch.amx_ready() and dispatch.dense_above("bf16") == dispatch.DENSE_ABOVE["bf16"]
    assert dispatch.dense_above("int8") == dispatch.DENSE_ABOVE["int8"]
    expand = [dispatch.sparse_mm(x, p, bias, "avx512") for p in (bf16, int8)]
    # bf16: another order of the fp32 sums, equal within rounding; int8: exact integer sums, equal
    assert not torch.equal(amx[0], expand[0])
    torch.testing.assert_close(amx[0], expand[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(amx[1], expand[1])
    monkeypatch.setenv("SPARSEFT_AMX", "1")
    monkeypatch.setenv("SPARSEFT_ISA", "avx2")
    assert not dispatch.amx_ready()  # the AVX-512 kernels only


@pytest.mark.skipif(not KERNEL_ISAS or not dispatch.amx_ready(), reason="no AMX here")
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_with_16_bit_activations_matches_reference(
    shape: tuple[int, int],
    awkward_weight: Callable[..., torch.Tensor],
    one_thread_and_several: Callable[..., tuple[torch.Tensor, torch.Tensor]],
) -> None:
    rows, cols = shape
    packed = pack_dense(awkward_weight(rows, cols), "int8")
    bound_w = reference.unpack(packed).abs().T
    g = torch.Generator().manual_seed(2)
    for batch in (1, 5, 16, 17, 32, 33, 40, 65, 130):  # 32 a pass: one or two groups of 16, a piece of 1 left
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(batch, cols, generator=g).to(dtype)
            bias = torch.randn(rows, generator=g) if batch % 2 else None
            y = dispatch.sparse_mm(x, packed, bias, "avx512", wide=True)
            ref = reference.sparse_mm(x, packed, bias, activation_bits=16)
            _assert_close(y, ref, x.float().abs() @ bound_w * (1 + 1 / 64), "int8")
    x = torch.randn(40, cols, generator=g)
    one, many = one_thread_and_several(lambda: dispatch.sparse_mm(x, packed, None, "avx512", wide=True))
    assert torch.equal(one, many)
    # the 16-bit activations lose next to nothing: far closer to the float product than 8-bit ones
    exact = x @ reference.unpack(packed).T
    eight = dispatch.sparse_mm(x, packed, None, "avx512")
    if exact.norm() > 0:
        assert (one - exact).norm() < (eight - exact).norm() / 50


@pytest.mark.skipif(not KERNEL_ISAS or not dispatch.amx_ready(), reason="no AMX here")
def test_int8_prompts_keep_16_bit_activations_up_to_the_switch(
    monkeypatch: pytest.MonkeyPatch, awkward_weight: Callable[..., torch.Tensor]
) -> None:
    packed = pack_dense(awkward_weight(50, 300), "int8")
    switch = dispatch.AMX_DENSE_ABOVE["int8"]
    for tokens, path in [(32, "8-bit"), (33, "16-bit"), (switch, "16-bit"), (switch + 1, "decompress")]:
        x = torch.randn(1, tokens, 300, dtype=torch.bfloat16)
        results = {
            "8-bit": dispatch.sparse_mm(x, packed, None, "avx512"),
            "16-bit": dispatch.sparse_mm(x, packed, None, "avx512", wide=True),
            "decompress": dispatch.decompressed_linear(x, packed, None, "avx512"),
        }
        y = dispatch.linear(x, packed, None)
        assert [name for name, r in results.items() if torch.equal(y, r)] == [path], tokens
    monkeypatch.setenv("SPARSEFT_AMX", "0")  # no AMX: decompressed from 33 tokens, as before
    x = torch.randn(40, 300)
    assert torch.equal(
        dispatch.linear(x, packed, None), dispatch.decompressed_linear(x, packed, None, "avx512")
    )
    with pytest.raises(RuntimeError, match="16-bit activations need"):
        dispatch.sparse_mm(x, packed, None, "avx512", wide=True)
    monkeypatch.delenv("SPARSEFT_AMX")
    with pytest.raises(RuntimeError, match="16-bit activations need"):
        dispatch.sparse_mm(x, pack_dense(awkward_weight(50, 300), "bf16"), None, "avx512", wide=True)


@pytest.mark.parametrize("isa", dispatch.available_isas())
def test_decompressed_path_adds_an_fp32_bias_unrounded(isa: str) -> None:
    weight = torch.zeros(40, 64)
    weight[:, ::3] = torch.randn(40, 22)
    packed = pack_dense(weight, "bf16")
    bias = torch.full((40,), 1000.3)  # 1000.0 in bf16
    x = torch.randn(3, 64)
    y = dispatch.decompressed_linear(x, packed, bias, isa)
    # fp32 inputs: bf16-rounded, multiplied and summed in fp32 as the kernels do
    product = x.bfloat16().float() @ weight.bfloat16().float().T
    assert (
        y - product - bias
    ).abs().max() < 0.01  # a bias rounded to bf16 (or a bf16 sum) is 0.3 or more off
    yb = dispatch.decompressed_linear(x.bfloat16(), packed, bias, isa)
    assert yb.dtype == torch.bfloat16


@pytest.mark.skipif(not KERNEL_ISAS or not dispatch.amx_ready(), reason="no AMX here")
def test_int8_model_prefills_a_long_prompt_with_16_bit_activations(
    monkeypatch: pytest.MonkeyPatch, pruned_model: Callable[..., torch.nn.Module]
) -> None:
    dense = pruned_model()
    sparse = copy.deepcopy(dense)
    sparsify_(sparse, "int8")
    calls: list[tuple[int, bool]] = []
    kernel = dispatch.sparse_mm

    def spy(
        x: torch.Tensor, p: Packed, bias: torch.Tensor | None, isa: str, wide: bool = False
    ) -> torch.Tensor:
        calls.append((x.numel() // p.shape[1], wide))
        return kernel(x, p, bias, isa, wide)

    monkeypatch.setattr(dispatch, "sparse_mm", spy)
    prompt = torch.randint(0, 320, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = sparse(prompt).logits.float()
        expected = dense(prompt).logits.float()
    # every linear of the 48-token forward (fused or not) took the 16-bit kernel
    assert calls and all(tokens == 48 and wide for tokens, wide in calls)
    assert ((logits - expected).norm() / expected.norm()).item() < 0.05


@pytest.mark.skipif(not KERNEL_ISAS, reason="the C++ kernels are not built here")
@pytest.mark.parametrize("isa", KERNEL_ISAS)
def test_int8_agrees_with_dequantized_product(isa: str, awkward_weight: Callable[..., torch.Tensor]) -> None:
    weight = awkward_weight(40, 200)
    packed = pack_dense(weight, "int8")
    x = torch.randn(3, 200)
    q, scale = reference.quantize_activations(x)
    dequantized = (q * scale) @ reference.unpack(packed).T
    y = dispatch.sparse_mm(x, packed, None, isa)
    torch.testing.assert_close(y, dequantized, rtol=1e-4, atol=1e-4)
    # and both stay close to the exact float product: the int8 error is small, not a different function
    exact = x @ weight.T
    assert ((y - exact).norm() / exact.norm()).item() < 0.02


@pytest.mark.skipif(not KERNEL_ISAS, reason="the C++ kernels are not built here")
@pytest.mark.parametrize("isa", KERNEL_ISAS)
def test_int8_sums_stay_exact_at_the_extremes(isa: str) -> None:
    # An archive quantized per channel may hold -128, and activations reach +-127: products of 128 * 127, which
    # the AVX2 kernel sums in pairs in 16 bits (vpmaddubsw saturates past 32767), must still add up exactly.
    rows, cols = 9, 200
    q = torch.full((rows, cols), -128, dtype=torch.int8)
    q[1::2] = 127
    q[2, ::3] = 0  # some zeros in the mask too
    q[4, 7:] = 0
    parts = bitmask_of(q.float())
    scale = torch.full((rows, 1), 1 / 128)
    values = parts["compressed"].to(torch.int8)
    packed = pack_bitmask(parts["shape"], values, parts["bitmask"], parts["row_offsets"], "int8", scale)
    signs = torch.where(torch.arange(cols) % 5 == 0, -1.0, 1.0)
    for batch in (1, 3, 8, 9, 17):
        x = torch.stack([signs * (-1) ** b for b in range(batch)])  # every activation quantizes to +-127
        torch.testing.assert_close(dispatch.sparse_mm(x, packed, None, isa), reference.sparse_mm(x, packed))


@pytest.mark.skipif(not KERNEL_ISAS, reason="the C++ kernels are not built here")
@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("shape", [(37, 100), (70, 130), (33, 257), (9, 384)])
def test_int4_group_sizes_match_reference(
    isa: str, group_size: int, shape: tuple[int, int], awkward_weight: Callable[..., torch.Tensor]
) -> None:
    # groups that end inside a mask word, at its end, across words, and a last group cut short by the columns
    rows, cols = shape
    packed = pack_dense(awkward_weight(rows, cols), "int4", group_size=group_size)
    assert packed.group_size == group_size and packed.scale is not None
    assert packed.scale.shape == (rows, -(-cols // group_size))
    bound_w = reference.unpack(packed).abs().T
    g = torch.Generator().manual_seed(2)
    for batch in (1, 2, 3, 4, 5, 8, 9, 16):
        x = torch.randn(batch, cols, generator=g)
        y = dispatch.sparse_mm(x, packed, None, isa)
        _assert_close(y, reference.sparse_mm(x, packed), x.abs() @ bound_w * (1 + 1 / 64), "int4")


@pytest.mark.skipif(not KERNEL_ISAS, reason="the C++ kernels are not built here")
@pytest.mark.parametrize("isa", KERNEL_ISAS)
def test_int4_reads_rows_that_start_mid_byte(isa: str, awkward_weight: Callable[..., torch.Tensor]) -> None:
    packed = pack_dense(awkward_weight(21, 96), "int4", group_size=32)
    starts = packed.row_start[:-1] % 2
    assert bool(starts.any()) and not bool(starts.all())  # some rows start at a high nibble
    x = torch.randn(3, 96)
    for start, stop in ((0, 21), (1, 9), (3, 20)):
        part = packed.rows(start, stop)
        y = dispatch.sparse_mm(x, part, None, isa)
        torch.testing.assert_close(y, reference.sparse_mm(x, packed)[:, start:stop], rtol=1e-5, atol=1e-5)
        assert torch.equal(dispatch.decompress(part, isa), reference.decompress(packed)[start:stop])


def test_int4_group_sizes_the_kernels_cannot_run_are_refused() -> None:
    for group_size in (16, 48, 100):
        with pytest.raises(SparseftError, match="multiples of 32"):
            pack_dense(torch.randn(4, 128), "int4", group_size=group_size)


@pytest.mark.skipif(not KERNEL_ISAS, reason="the C++ kernels are not built here")
@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("batch", [1, 4, 16, 40])  # 16, 40: the AMX kernels, where present (40: three groups)
def test_threads_split_uneven_rows(
    isa: str, kind: str, batch: int, one_thread_and_several: Callable[..., tuple[torch.Tensor, torch.Tensor]]
) -> None:
    # dense first half, nearly empty second half: the split by bytes must still cover every row once, and a
    # thread's tiles of spaced rows (6 or 8 at batch 1, 2 above, 16 on AMX) must leave none out where its range
    # does not divide. The part with fewer, denser rows is done first (the expand kernels' cost goes by columns,
    # not bytes), and its thread then takes tile steps of the other part: the results must not change.
    weight = torch.randn(301, 515)
    weight[150:][torch.rand(151, 515) < 0.97] = 0
    packed = pack_dense(weight, kind)  # type: ignore[arg-type]
    x = torch.randn(batch, 515)
    one, many = one_thread_and_several(lambda: dispatch.sparse_mm(x, packed, None, isa))
    torch.testing.assert_close(many, one, rtol=0, atol=0)
    torch.testing.assert_close(one, reference.sparse_mm(x, packed), rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(not KERNEL_ISAS, reason="the C++ kernels are not built here")
@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
def test_decompress_matches_reference(
    isa: str, kind: str, awkward_weight: Callable[..., torch.Tensor]
) -> None:
    for rows, cols in SHAPES:
        packed = pack_dense(awkward_weight(rows, cols), kind)  # type: ignore[arg-type]
        assert torch.equal(dispatch.decompress(packed, isa), reference.decompress(packed))


@pytest.mark.skipif("avx512" not in KERNEL_ISAS, reason="no AVX-512 BF16 on this CPU")
def test_dense_gemv_matches_reference() -> None:
    for rows, cols in [(7, 33), (64, 64), (129, 200)]:
        weight = torch.randn(rows, cols).bfloat16()
        for batch in (1, 3, 9):
            x = torch.randn(batch, cols)
            bias = torch.randn(rows)
            torch.testing.assert_close(
                dispatch.dense_mm(x, weight, bias), reference.dense_mm(x, weight, bias), rtol=1e-4, atol=1e-4
            )


def test_large_batches_take_the_dense_path(
    monkeypatch: pytest.MonkeyPatch, awkward_weight: Callable[..., torch.Tensor]
) -> None:
    packed = pack_dense(awkward_weight(30, 70), "bf16")
    x = torch.randn(2, 5, 70, dtype=torch.bfloat16)
    monkeypatch.setenv("SPARSEFT_DENSE_ABOVE", "4")
    y = dispatch.linear(x, packed, None)
    expected = torch.nn.functional.linear(x, reference.decompress(packed))
    assert y.shape == (2, 5, 30)
    torch.testing.assert_close(y, expected)
    bias = torch.randn(30)
    monkeypatch.setattr(dispatch, "_DECOMPRESS_BYTES", 2 * 70 * 7)  # blocks of 7 rows, the last one short
    for native in (True, False):  # a CPU with bf16 matrix instructions multiplies in bf16, others in fp32
        monkeypatch.setattr(dispatch, "native_bf16_matmul", lambda native=native: native)
        for kind in ("bf16", "int8", "int4"):
            blocked = pack_dense(awkward_weight(30, 70), kind)  # type: ignore[arg-type]
            w = reference.decompress(blocked)
            if native:
                expected = torch.nn.functional.linear(x, w, bias.bfloat16())
            else:
                expected = torch.nn.functional.linear(x.float(), w.float(), bias).bfloat16()
            torch.testing.assert_close(dispatch.linear(x, blocked, bias), expected, rtol=0, atol=0)
    monkeypatch.setenv("SPARSEFT_DENSE_ABOVE", "four")
    with pytest.raises(SparseftError, match="SPARSEFT_DENSE_ABOVE"):
        dispatch.linear(x, packed, None)


@pytest.mark.skipif("avx512" not in KERNEL_ISAS, reason="no AVX-512 here")
def test_the_bf16_prefill_switch_follows_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSEFT_AMX", "0")
    for intel, expected in (
        (True, dispatch.DENSE_ABOVE["bf16"]),
        (False, dispatch.OTHER_DENSE_ABOVE["bf16"]),
    ):
        monkeypatch.setattr(dispatch, "_intel_cpu", lambda intel=intel: intel)
        assert dispatch.dense_above("bf16", "avx512") == expected
        assert dispatch.dense_above("bf16", "avx2") == dispatch.AVX2_DENSE_ABOVE["bf16"]  # another kernel
        assert dispatch.dense_above("int8", "avx512") == dispatch.DENSE_ABOVE["int8"]
    ext = dispatch.extension()
    assert ext.bf16_fma_tiles(-1) == ext.intel_cpu()  # by default the small bf16 tiles follow the vendor too


@pytest.mark.skipif("avx2" not in KERNEL_ISAS, reason="no AVX2 here")
def test_bf16_batches_stay_on_the_avx2_kernel_to_its_switch(
    monkeypatch: pytest.MonkeyPatch, awkward_weight: Callable[..., torch.Tensor]
) -> None:
    monkeypatch.setenv("SPARSEFT_ISA", "avx2")
    packed = pack_dense(awkward_weight(30, 70), "bf16")
    switch = dispatch.dense_above("bf16")
    assert switch == dispatch.AVX2_DENSE_ABOVE["bf16"] > dispatch.DENSE_ABOVE["bf16"]
    taken: list[str] = []
    for name in ("sparse_mm", "decompressed_linear"):
        original = getattr(dispatch, name)
        monkeypatch.setattr(dispatch, name, lambda *a, o=original, n=name, **k: taken.append(n) or o(*a, **k))
    for tokens in (dispatch.DENSE_ABOVE["bf16"] + 1, switch, switch + 1):
        dispatch.linear(torch.randn(tokens, 70).bfloat16(), packed, None)
    assert taken == ["sparse_mm", "sparse_mm", "decompressed_linear"]


def test_isa_is_forced_by_setting_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSEFT_ISA", "torch")
    assert dispatch.current_isa() == "torch"
    monkeypatch.setenv("SPARSEFT_ISA", "sse9")
    with pytest.raises(SparseftError, match="SPARSEFT_ISA"):
        dispatch.current_isa()
    monkeypatch.delenv("SPARSEFT_ISA")
    assert dispatch.current_isa() == dispatch.best_isa()
    try:
        dispatch.set_isa("torch")
        assert dispatch.current_isa() == "torch"
    finally:
        dispatch.set_isa(None)
    with pytest.raises(SparseftError, match="unknown instruction set"):
        dispatch.set_isa("neon")


@pytest.mark.skipif(
    dispatch.best_isa() == "torch" or platform.machine() not in ("x86_64", "AMD64"),
    reason="the clock probe needs the C++ kernels on x86-64",
)
def test_clock_probe_reads_a_plausible_clock() -> None:
    # the same probe twice: a clock of a few GHz, and two reads within a factor of two of each other
    first, second = dispatch.clock_ghz(), dispatch.clock_ghz()
    assert first is not None and second is not None
    assert 0.5 < first < 7 and 0.5 < second < 7 and 0.5 < first / second < 2


@pytest.mark.skipif(not KERNEL_ISAS, reason="the C++ kernels are not built here")
def test_tensors_the_kernels_read_raw_must_be_contiguous_cpu_arrays(
    awkward_weight: Callable[..., torch.Tensor],
) -> None:
    packed = pack_dense(awkward_weight(16, 40), "int8")
    x = torch.randn(1, 40)
    for bias in (torch.arange(32.0)[::2], torch.tensor([1.0]).expand(16)):  # strided, and one value 16 times
        with pytest.raises(RuntimeError, match="bias must be a contiguous CPU tensor"):
            dispatch.sparse_mm(x, packed, bias, KERNEL_ISAS[-1])
    if "avx512" in KERNEL_ISAS:  # the dense GEMV kernel is AVX-512 only; elsewhere dense_mm is torch's
        with pytest.raises(RuntimeError, match="weight must be a contiguous CPU tensor"):
            dispatch.dense_mm(x.bfloat16(), torch.empty(16, 40, dtype=torch.bfloat16, device="meta"))


@pytest.mark.skipif(not KERNEL_ISAS, reason="the C++ kernels are not built here")
def test_a_packed_weight_whose_offsets_disagree_with_its_mask_is_refused(
    awkward_weight: Callable[..., torch.Tensor],
) -> None:
    packed = pack_dense(awkward_weight(16, 40), "bf16")
    for change in (
        lambda r: r.__setitem__(4, 10**10),
        lambda r: r.__setitem__(0, 1),
        lambda r: r.__setitem__(4, 0),
    ):
        row_start = packed.row_start.clone()
        change(row_start)
        broken = Packed(packed.shape, packed.mask, packed.values, row_start)
        with pytest.raises(SparseftError, match="inconsistent"):
            SparseLinear(broken)
    SparseLinear(packed)  # the packed original is fine


@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_int8_activations_with_nan_or_inf_give_nan(
    isa: str, kind: str, awkward_weight: Callable[..., torch.Tensor]
) -> None:
    packed = pack_dense(awkward_weight(16, 100), kind)  # type: ignore[arg-type]
    x = torch.randn(3, 100)
    x[0, 7], x[1, 99] = float("nan"), float("inf")  # in the vector part, and in the tail
    y = dispatch.sparse_mm(x, packed, None, isa)
    assert y[0].isnan().all() and y[1].isnan().all() and y[2].isfinite().all()


@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_activations_round_halves_to_even(isa: str, dtype: torch.dtype) -> None:
    # With max |x| = 127 the scale is 1 and x / scale lands on halves, which every level must round as torch.round
    # does (0.5 -> 0, 1.5 -> 2, 2.5 -> 2), in the vector part and in the tail of 101 columns. The identity weight
    # hands the quantized activations back.
    cols = 101
    x = torch.arange(cols) % 40 - 19.5
    x[3] = 127.0
    x = x.to(dtype).unsqueeze(0)
    y = dispatch.sparse_mm(x, pack_dense(torch.eye(cols), "int8"), None, isa).float()
    q, scale = reference.quantize_activations(x)
    assert (q[0, :40].abs() % 2 == 0).sum() > 20  # halves went to even, not away from zero
    torch.testing.assert_close(y, q * scale, rtol=1e-6, atol=0)


def test_weights_the_int8_kernels_cannot_sum_are_refused() -> None:
    with pytest.raises(SparseftError, match="at most 65536 input columns"):
        pack_dense(torch.ones(1, 70000), "int8")
    with pytest.raises(SparseftError, match="with input columns"):
        pack_dense(torch.ones(3, 0))
