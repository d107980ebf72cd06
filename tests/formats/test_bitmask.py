import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

import sparseft
from sparseft import formats, runtime
from sparseft.errors import SparseftError
from sparseft.formats import bitmask
from sparseft.hf import find_targets, weight_matrix
from sparseft.quant.spec import QuantSpec, rtn_quantize
from tests.helpers import bits_of, pruned_dir, read_config


@pytest.mark.parametrize(
    ("dtype", "arch"), [("float32", "llama"), ("bfloat16", "llama"), ("float32", "gpt2")]
)
def test_prune_export_load_is_bit_identical(
    make_model_dir: Callable[..., Path], tmp_path: Path, dtype: str, arch: str
) -> None:
    source = pruned_dir(make_model_dir, tmp_path, dtype, arch)
    report = sparseft.export(str(source), tmp_path / "archive", "bitmask", progress=False)
    original = transformers.AutoModelForCausalLM.from_pretrained(source)
    loaded = sparseft.load(tmp_path / "archive")

    assert type(loaded) is type(original)
    assert next(loaded.parameters()).dtype == getattr(torch, dtype)
    assert report["layers"] and all(abs(v["sparsity"] - 0.7) < 0.01 for v in report["layers"].values())
    expected, got = bits_of(original), bits_of(loaded)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    if arch == "gpt2":  # Conv1D weights are stored as (out, in) and transposed back on load
        assert read_config(tmp_path / "archive")["transposed"]


def test_negative_zero_and_every_bit_pattern_round_trip() -> None:
    weight = torch.tensor([[0.0, -0.0, 1.5, 0.0, -2.0, 0.0, 0.0, 0.0, 3.0], [0.0] * 9], dtype=torch.bfloat16)
    parts = formats.compress(weight)
    decoded = formats.decompress({**parts, "shape": tuple(parts["shape"].tolist())}, torch.bfloat16)
    assert torch.equal(decoded.view(torch.int16), weight.view(torch.int16))
    assert parts["row_offsets"].tolist() == [0, 4]
    assert parts["bitmask"].tolist() == [[0b00010110, 0b1], [0, 0]]


def decode_independently(directory: Path) -> dict[str, np.ndarray]:
    """A decoder written from the format description alone: numpy, unpackbits with little bit order."""
    index = directory / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        tensors.update(load_numpy(str(directory / file)))
    quant = read_config(directory)["quantization"]
    dense = {}
    for key in [k for k in tensors if k.endswith(".bitmask")]:
        name = key.removesuffix(".bitmask")
        rows, cols = tensors[f"{name}.shape"].tolist()
        bitmask = tensors[key]
        assert bitmask.dtype == np.uint8 and bitmask.shape == (rows, math.ceil(cols / 8))
        mask = np.unpackbits(bitmask, axis=1, bitorder="little")[:, :cols].astype(bool)
        counts = mask.sum(axis=1)
        assert (tensors[f"{name}.row_offsets"] == np.cumsum(counts) - counts).all()
        values = tensors[f"{name}.compressed"]
        if quant is None:
            out = np.zeros((rows, cols), dtype=values.dtype)
            out[mask] = values
        else:
            if quant["bits"] == 4:
                nibbles = (
                    np.stack([values & 0xF, values >> 4], axis=1).reshape(-1)[: mask.sum()].astype(np.int8)
                )
                values = np.where(nibbles >= 8, nibbles - 16, nibbles)
            ints = np.zeros((rows, cols), dtype=np.float32)
            ints[mask] = values
            scale = tensors[f"{name}_scale"].astype(np.float32)
            group = quant["group_size"] or cols
            out = ints * np.repeat(scale, group, axis=1)[:, :cols]
        dense[name] = out
    return dense


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_independent_numpy_decoder_reads_the_archive(
    make_model_dir: Callable[..., Path], tmp_path: Path, quantize: str | None
) -> None:
    source = pruned_dir(make_model_dir, tmp_path, "float32")
    sparseft.export(
        str(source),
        tmp_path / "archive",
        "bitmask",
        quantize,
        group_size=16 if quantize == "int4" else None,
        progress=False,
    )
    loaded = sparseft.load(tmp_path / "archive")
    decoded = decode_independently(tmp_path / "archive")

    targets = find_targets(loaded)
    assert set(decoded) == {f"{n}.weight" for n in targets}
    for name, module in targets.items():
        expected = weight_matrix(module).numpy()
        if quantize is None:
            assert np.array_equal(decoded[f"{name}.weight"], expected), name
        else:
            assert np.allclose(decoded[f"{name}.weight"], expected, rtol=1e-6, atol=1e-7), name


def test_an_archive_re_exports_as_hf(make_model_dir: Callable[..., Path], tmp_path: Path) -> None:
    source = pruned_dir(make_model_dir, tmp_path, "bfloat16")
    sparseft.export(str(source), tmp_path / "archive", "bitmask", progress=False)
    sparseft.export(str(tmp_path / "archive"), tmp_path / "hf", "hf", progress=False)
    original = bits_of(transformers.AutoModelForCausalLM.from_pretrained(source))
    again = bits_of(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf"))
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)


def test_sharded_archive_keeps_each_weight_in_one_file(
    make_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(pruned_dir(make_model_dir, tmp_path, "float32"))
    targets = find_targets(model)
    out = tmp_path / "sharded"
    out.mkdir()
    formats.write_bitmask(model, targets, out, max_shard_bytes=30_000)

    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 2
    for name in formats.read_archive(out).compressed_names():
        assert len({weight_map[f"{name}.{part}"] for part in formats.PARTS}) == 1
    for key, value in bits_of(formats.load_dir(out)).items():
        assert torch.equal(value, bits_of(model)[key]), key


def test_reader_api_gives_parts_without_a_model(make_model_dir: Callable[..., Path], tmp_path: Path) -> None:
    source = pruned_dir(make_model_dir, tmp_path, "bfloat16")
    sparseft.export(str(source), tmp_path / "q", "bitmask", "int4", group_size=32, progress=False)
    archive = formats.read_archive(tmp_path / "q")

    assert archive.config["model_type"] == "llama"
    name = "model.layers.0.mlp.down_proj.weight"
    assert name in archive.compressed_names() and name not in archive.tensor_names()
    parts = archive.compressed(name)
    assert parts["shape"] == (60, 120) and parts["bits"] == 4 and parts["group_size"] == 32
    assert parts["scale"].shape == (60, 4) and parts["scale"].dtype == torch.bfloat16
    assert archive.tensor("model.norm.weight").shape == (60,)


def test_shape_not_matching_the_bitmask_is_a_clear_error(archive: Path) -> None:
    tensors = load_file(str(archive / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight.shape"] = torch.tensor([120, 70])
    save_file(tensors, str(archive / "model.safetensors"))
    with pytest.raises(SparseftError, match="up_proj.weight is inconsistent: bitmask"):
        sparseft.load(archive)


def test_values_not_matching_the_bitmask_is_a_clear_error(archive: Path) -> None:
    tensors = load_file(str(archive / "model.safetensors"))
    key = "model.layers.1.self_attn.q_proj.weight.compressed"
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, str(archive / "model.safetensors"))
    with pytest.raises(SparseftError, match="q_proj.weight is inconsistent: compressed"):
        formats.read_archive(archive).dense("model.layers.1.self_attn.q_proj.weight")


def test_a_failure_while_writing_leaves_no_output(
    make_model_dir: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def failing(matrix: torch.Tensor, quantized: object = None) -> dict:
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk full")
        return original(matrix, quantized)

    original = bitmask.compress
    monkeypatch.setattr(bitmask, "compress", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        sparseft.export(str(make_model_dir("llama", hidden=60)), tmp_path / "out", "bitmask", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_rtn_quantized_archive_matches_quantizing_by_hand(
    make_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    source = pruned_dir(make_model_dir, tmp_path, "bfloat16")
    sparseft.export(str(source), tmp_path / "q4", "bitmask", "int4", group_size=32, progress=False)
    original = transformers.AutoModelForCausalLM.from_pretrained(source)
    loaded = sparseft.load(tmp_path / "q4")
    for name, module in find_targets(original).items():
        weight = weight_matrix(module)
        expected = rtn_quantize(weight, QuantSpec(4, 32)).dequantize(torch.bfloat16)
        got = weight_matrix(loaded.get_submodule(name))
        assert torch.equal(got, expected), name
        assert bool((got[weight == 0] == 0).all()), name


@pytest.mark.parametrize("prefix", ["weight", "module"])
def test_reads_legacy_sparse_bitmask_checkpoints(
    make_model_dir: Callable[..., Path], tmp_path: Path, prefix: str
) -> None:
    """A compressed-tensors "sparse-bitmask" checkpoint, written here with numpy from its description: its parts
    named after the weight (older releases: "x.weight.shape") or after the module (current ones: "x.shape")."""
    source = pruned_dir(make_model_dir, tmp_path, "float32")
    state = load_numpy(str(source / "model.safetensors"))
    legacy: dict[str, np.ndarray] = {}
    for name, value in state.items():
        if "layers" in name and name.endswith("proj.weight"):
            mask = value != 0
            key = name if prefix == "weight" else name.removesuffix(".weight")
            legacy[f"{key}.shape"] = np.array(value.shape, dtype=np.int64)
            legacy[f"{key}.bitmask"] = np.packbits(mask, axis=1, bitorder="little")
            legacy[f"{key}.compressed"] = value[mask]
            legacy[f"{key}.row_offsets"] = (np.cumsum(mask.sum(1)) - mask.sum(1)).astype(np.int64)
        else:
            legacy[name] = value
    out = tmp_path / "legacy"
    out.mkdir()
    save_numpy(legacy, str(out / "model.safetensors"))
    config = read_config(source)
    config["compression_config"] = {"sparsity_config": {"format": "sparse-bitmask", "global_sparsity": 0.7}}
    (out / "config.json").write_text(json.dumps(config))

    loaded = bits_of(sparseft.load(out))
    expected = bits_of(transformers.AutoModelForCausalLM.from_pretrained(source))
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert sparseft.api.info(out)["format"] == "bitmask"
    sparse = runtime.load(out, fuse=False, decoder="transformers")  # the runtime reads it too
    assert (
        sum(isinstance(m, runtime.SparseLinear) for m in sparse.modules())
        == len(formats.read_archive(out).compressed_names())
        > 0
    )
