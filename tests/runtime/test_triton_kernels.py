"""Triton sparse kernels against the plain-torch reference.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, float32 values, small shapes); with
one, compiled on it for every value type and batch 1..16.

Triton picks interpreted or compiled when a function is defined, its own helpers (tl.zeros, tl.cumsum) included,
so the interpreter must be switched on before triton is first imported. Without a GPU, if this module is the
first to import triton it sets TRITON_INTERPRET=1 and runs the interpreter tests here (the variable stays set:
nothing else in sparseft runs Triton on the CPU). In a full test run something else (transformers, through
torch) has usually imported triton already; then one test reruns this file in a fresh process with the variable
set.
"""

from __future__ import annotations

import gc
import importlib
import os
import subprocess
import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch

from sparseft.errors import SparseftError
from sparseft.runtime.triton_pack import pack_dense, reference_linear, unpack_reference

CUDA = torch.cuda.is_available()
if not CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip(
    "triton", reason="triton is not installed (pip install -e .[gpu]); GPU kernels untested"
)
tl = triton.language

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU; the interpreter tests cover the CPU")
interpreter_only = pytest.mark.skipif(
    CUDA or not INTERPRETED,
    reason="a GPU is present (kernels tested compiled instead)"
    if CUDA
    else "triton was imported before TRITON_INTERPRET could be set: test_interpreter_in_a_fresh_process runs these",
)


@pytest.mark.skipif(CUDA or INTERPRETED, reason="the interpreter tests run in this process")
def test_interpreter_in_a_fresh_process() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-rs"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "TRITON_INTERPRET could be set" not in run.stdout, run.stdout[-3000:]


@triton.jit
def swar_popc(v):
    """popcount of int32 with bit tricks (Hacker's Delight 5-2): stands in for the GPU's popc in the interpreter."""
    u = v.to(tl.uint32, bitcast=True)
    u = u - ((u >> 1) & 0x55555555)
    u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
    u = (u + (u >> 4)) & 0x0F0F0F0F
    return ((u * 0x01010101) >> 24).to(tl.int32)


@pytest.fixture(scope="module")
def kernels() -> ModuleType:
    return importlib.import_module("sparseft.runtime.triton_kernels")


def sparse_weight(rows: int, cols: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    """Random weight with an empty row and a fully dense row: the edge cases of the position arithmetic."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    w[torch.rand(rows, cols, generator=gen) < sparsity] = 0
    w[1] = 0
    w[2] = torch.randn(cols, generator=gen).abs() + 0.1
    return w


def assert_close(y: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    err = (y.float() - ref).abs().max() / ref.abs().max()
    assert err < rel, f"max error {err:.2e} relative to max |y|"


# Rows and columns are not multiples of 16 / 64 / 8, and there are 3 x 3 tiles.
SHAPE = (37, 150)


@interpreter_only
@pytest.mark.parametrize("values", ["fp32", "int8", "fp8"])
@pytest.mark.parametrize("batch", [1, 3, 8, 16])
def test_interpreter_matches_reference(kernels: ModuleType, values: str, batch: int) -> None:
    packed = pack_dense(sparse_weight(*SHAPE, sparsity=0.7), values=values)
    x = torch.randn(batch, SHAPE[1])
    assert_close(kernels.sparse_matmul(x, packed), reference_linear(x, packed), 1e-5)


@interpreter_only
@pytest.mark.parametrize("row_tiles, split, batch", [(1, 3, 1), (2, 2, 4), (4, 2, 16), (1, 1, 8)])
def test_interpreter_launch_configs_agree(
    kernels: ModuleType, row_tiles: int, split: int, batch: int
) -> None:
    packed = pack_dense(sparse_weight(70, 200, sparsity=0.5, seed=1), values="fp32")
    x = torch.randn(batch, 200)
    config = kernels.LaunchConfig(row_tiles=row_tiles, split=split)
    assert_close(kernels.sparse_matmul(x, packed, config), reference_linear(x, packed), 1e-5)


@interpreter_only
@pytest.mark.parametrize("batch", [1, 16])
def test_interpreter_popc_path(kernels: ModuleType, monkeypatch: pytest.MonkeyPatch, batch: int) -> None:
    """The GPU's popcount arithmetic, run in the interpreter with a bit-trick popcount standing in for popc."""
    monkeypatch.setattr(kernels, "libdevice", SimpleNamespace(popc=swar_popc))
    monkeypatch.setattr(kernels, "_use_popc", lambda device: True)
    w = sparse_weight(*SHAPE, sparsity=0.6)
    w[5, 31] = w[5, 63] = w[6, 32] = 1.5  # bit 31 of a word: the sign bit of the int32 mask words
    packed = pack_dense(w, values="fp32")
    x = torch.randn(batch, SHAPE[1])
    assert_close(kernels.sparse_matmul(x, packed), reference_linear(x, packed), 1e-5)
    assert torch.equal(kernels.unpack_dense(packed, torch.float32), unpack_reference(packed))


@interpreter_only
def test_interpreter_linear_bias_leading_dims_and_dense_fallback(kernels: ModuleType) -> None:
    packed = pack_dense(sparse_weight(*SHAPE, sparsity=0.7), values="int8")
    bias = torch.randn(SHAPE[0])
    for shape in [(2, 3, SHAPE[1]), (3, 7, SHAPE[1])]:  # 6 rows of x: sparse kernel; 21 rows: dense path
        x = torch.randn(shape)
        y = kernels.triton_sparse_linear(x, packed, bias)
        assert y.shape == (*shape[:-1], SHAPE[0])
        assert_close(y, reference_linear(x, packed) + bias, 1e-5)
    assert torch.equal(kernels.unpack_dense(packed, torch.float32), unpack_reference(packed))


@interpreter_only
def test_interpreter_sparse_linear_layout_is_repacked_once(kernels: ModuleType) -> None:
    from sparseft.runtime import packing, reference

    layout = packing.pack_dense(sparse_weight(*SHAPE, sparsity=0.7), "int8", "w")
    bias, x = torch.randn(SHAPE[0]), torch.randn(2, SHAPE[1])
    y = kernels.runtime_linear(x, layout, bias)
    assert_close(y, x @ reference.unpack(layout).T + bias, 1e-5)
    key = id(layout)
    cached = kernels._gpu_packs[key]
    kernels.runtime_linear(x, layout, bias)
    assert kernels._gpu_packs[key] is cached
    del layout
    gc.collect()
    assert key not in kernels._gpu_packs


@interpreter_only
def test_bad_input_raises(kernels: ModuleType) -> None:
    packed = pack_dense(sparse_weight(*SHAPE, sparsity=0.7))
    with pytest.raises(SparseftError, match=r"\(\.\.\., 150\)"):
        kernels.triton_sparse_linear(torch.randn(2, 149), packed)
    with pytest.raises(SparseftError, match="1..16"):
        kernels.sparse_matmul(torch.randn(17, 150), packed)


@requires_cuda
@pytest.mark.parametrize("values", ["bf16", "fp16", "int8", "fp8"])
def test_gpu_every_value_type_and_batch(kernels: ModuleType, values: str) -> None:
    if values == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9+")
    packed = pack_dense(sparse_weight(300, 1000, sparsity=0.7), values=values).to("cuda")
    for batch in range(1, 17):
        x = torch.randn(batch, 1000, device="cuda", dtype=torch.bfloat16)
        y = kernels.sparse_matmul(x, packed)
        assert y.dtype == torch.bfloat16
        assert_close(y, reference_linear(x, packed), 2e-2)  # bf16 output rounding; tl.dot rounds x to bf16
    x = torch.randn(40, 1000, device="cuda", dtype=torch.bfloat16)
    assert_close(kernels.triton_sparse_linear(x, packed), reference_linear(x, packed), 2e-2)


@requires_cuda
def test_gpu_decode_step_captures_in_a_cuda_graph(kernels: ModuleType) -> None:
    packed = pack_dense(sparse_weight(256, 512, sparsity=0.7), values="bf16").to("cuda")
    x = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
    kernels.triton_sparse_linear(x, packed)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = kernels.triton_sparse_linear(x, packed)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(y, reference_linear(x, packed), 2e-2)


@requires_cuda
def test_gpu_sparse_linear_inside_generate(kernels: ModuleType) -> None:
    import transformers

    from sparseft.demo.tiny import tiny_config
    from sparseft.pruning.magnitude import magnitude_prune
    from sparseft.runtime import sparsify_

    torch.manual_seed(0)
    dense = transformers.AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=128, hidden=128))
    with torch.no_grad():
        for module in dense.model.layers.modules():
            if isinstance(module, torch.nn.Linear):  # bf16-exact weights: the sparse copy stores bf16 values
                module.weight.copy_(magnitude_prune(module.weight, 0.7).bfloat16().float())
    sparse = transformers.AutoModelForCausalLM.from_config(dense.config)
    sparse.load_state_dict(dense.state_dict())
    sparsify_(sparse, values="bf16", fast_head=False)
    dense, sparse = dense.cuda().eval(), sparse.cuda().eval()
    prompt = torch.randint(0, 128, (1, 12), device="cuda")
    with torch.no_grad():
        want = dense.generate(prompt, max_new_tokens=16, do_sample=False)
        got = sparse.generate(prompt, max_new_tokens=16, do_sample=False)
    assert torch.equal(got, want)
