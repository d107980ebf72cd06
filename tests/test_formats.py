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
from sparseft.cli import main
from sparseft.errors import SparseftError
from sparseft.models import find_targets, weight_matrix
from sparseft.quant import QuantSpec, rtn_quantize


def pruned_dir(make_model_dir: Callable[..., Path], tmp_path: Path, dtype: str, arch: str = "llama") -> Path:
    """A magnitude-pruned checkpoint whose layers have 60 or 120 inputs: not multiples of 8."""
    out = tmp_path / f"pruned-{arch}-{dtype}"
    sparseft.prune(
        str(make_model_dir(arch, hidden=60)),
        out,
        method="magnitude",
        sparsity=0.7,
        dtype=dtype,
        progress=False,
    )
    return out


def bits_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the state dict as raw bytes, so that equality is bit-for-bit (-0.0 and NaN included)."""
    return {k: v.detach().contiguous().view(torch.uint8) for k, v in model.state_dict().items()}


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


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


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_hf_checkpoint_loads_in_transformers_with_compressed_tensors(
    make_model_dir: Callable[..., Path], tmp_path: Path, quantize: str
) -> None:
    pytest.importorskip("compressed_tensors")
    source = tmp_path / "pruned"
    sparseft.prune(
        str(make_model_dir("llama", hidden=64)), source, method="magnitude", sparsity=0.6, progress=False
    )
    sparseft.export(
        str(source),
        tmp_path / "int8",
        "hf",
        quantize,
        group_size=32 if quantize == "int4" else None,
        progress=False,
    )
    config = read_config(tmp_path / "int8")["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert "sparsity_config" not in config

    ours = sparseft.load(tmp_path / "int8")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "int8").eval()
    dense = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = ours(ids).logits, theirs(ids).logits, dense(ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert 0 < (a - c).abs().max() < (0.05 if quantize == "int8" else 0.5)  # quantized, but only slightly
    for name, module in find_targets(ours).items():
        pruned = weight_matrix(find_targets(dense)[name]) == 0
        assert bool((weight_matrix(module)[pruned] == 0).all()), name


def test_pack_int32_matches_compressed_tensors() -> None:
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    gen = torch.Generator().manual_seed(0)
    for bits, columns in [(4, 72), (8, 30), (4, 5)]:
        q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (6, columns), generator=gen).to(torch.int8)
        packed = formats.pack_int32(q, bits)
        assert torch.equal(packed, helpers.pack_to_int32(q, bits))
        assert torch.equal(formats.unpack_int32(packed, bits, columns), q)


def test_gptq_export_records_calibration_and_errors(
    make_model_dir: Callable[..., Path], tmp_path: Path, text_file: Path
) -> None:
    source = pruned_dir(make_model_dir, tmp_path, "float32")
    report = sparseft.export(
        str(source),
        tmp_path / "g",
        "bitmask",
        "int4",
        32,
        "gptq",
        dataset=str(text_file),
        num_samples=2,
        seqlen=32,
    )
    assert report["calibration"]["num_samples"] == 2 and report["quantization"]["method"] == "gptq"
    assert report["mean_gptq_output_error"] < report["mean_rtn_output_error"]
    assert json.loads((tmp_path / "g" / "export.json").read_text())["layers"] == report["layers"]
    loaded = sparseft.load(tmp_path / "g")
    original = transformers.AutoModelForCausalLM.from_pretrained(source)
    for name, module in find_targets(original).items():
        pruned = weight_matrix(module) == 0
        assert bool((weight_matrix(loaded.get_submodule(name))[pruned] == 0).all()), name
    with pytest.raises(SparseftError, match="needs calibration data"):
        sparseft.export(str(source), tmp_path / "h", "bitmask", "int4", 32, "gptq")
    with pytest.raises(SparseftError, match="pass --quantize"):
        sparseft.export(str(source), tmp_path / "h", "bitmask", None, 32, "gptq", dataset=str(text_file))


def test_hf_int4_needs_whole_groups(make_model_dir: Callable[..., Path], tmp_path: Path) -> None:
    with pytest.raises(SparseftError, match="group-size"):
        sparseft.export(
            str(make_model_dir("llama", hidden=60)), tmp_path / "x", "hf", "int4", 128, progress=False
        )
    assert not (tmp_path / "x").exists()


def test_hf_export_warns_where_vllm_would_refuse_it(
    make_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    source = str(make_model_dir("llama", hidden=64))
    with pytest.warns(
        UserWarning, match=r"q_proj/k_proj/v_proj .* in 2 layers .*layers\.0\.self_attn: k_proj not"
    ):
        report = sparseft.export(source, tmp_path / "split", "hf", "int8", ignore=["k_proj"], progress=False)
    assert len(report["vllm_warnings"]) == 1 and "gate_proj" not in report["vllm_warnings"][0]
    with pytest.warns(UserWarning, match="group sizes 32, 64, 128; --group-size 16"):
        report = sparseft.export(source, tmp_path / "g16", "hf", "int4", 16, progress=False)
    assert len(report["vllm_warnings"]) == 1
    # whole groups left out, and the usual group sizes, are fine
    report = sparseft.export(
        source, tmp_path / "fine", "hf", "int4", 32, ignore=["gate_proj", "up_proj"], progress=False
    )
    assert report["vllm_warnings"] == []


def test_info_reports_sparsity_bits_and_bytes(make_model_dir: Callable[..., Path], tmp_path: Path) -> None:
    source = pruned_dir(make_model_dir, tmp_path, "bfloat16")
    sparseft.export(str(source), tmp_path / "b", "bitmask", progress=False)
    sparseft.export(str(source), tmp_path / "b8", "bitmask", "int8", progress=False)
    plain, int8 = sparseft.api.info(tmp_path / "b"), sparseft.api.info(tmp_path / "b8")
    hf = sparseft.api.info(source)

    assert plain["format"] == "bitmask" and hf["format"] == "hf"
    assert plain["layers"].keys() == hf["layers"].keys()
    for name, layer in plain["layers"].items():
        rows, cols = layer["rows"], layer["columns"]
        kept = round((1 - layer["sparsity"]) * rows * cols)
        assert abs(layer["sparsity"] - 0.7) < 0.01 and layer["bits"] == 16
        assert int8["layers"][name]["bits"] == 8
        # values + bitmask + int64 row offsets + the shape; int8 adds one bf16 scale per row
        overhead = rows * math.ceil(cols / 8) + 8 * rows + 16
        assert layer["bytes"] == 2 * kept + overhead
        assert int8["layers"][name]["bytes"] == kept + overhead + 2 * rows
    assert hf["layers_bytes_per_weight"] == 2.0
    assert plain["size_on_disk"] < hf["size_on_disk"]


def test_cli_export_and_info(
    make_model_dir: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = pruned_dir(make_model_dir, tmp_path, "float32")
    assert main(["export", str(source), "-o", str(tmp_path / "out"), "--quantize", "int8"]) == 0
    assert main(["info", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "bitmask + int8 (rtn)" in out and "model.layers.1.mlp.up_proj.weight" in out
    assert main(["export", str(source), "-o", str(tmp_path / "out")]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err


# ---- bad input -------------------------------------------------------------------------------------------------


@pytest.fixture
def archive(make_model_dir: Callable[..., Path], tmp_path: Path) -> Path:
    source = pruned_dir(make_model_dir, tmp_path, "float32")
    sparseft.export(str(source), tmp_path / "archive", "bitmask", progress=False)
    return tmp_path / "archive"


def test_truncated_safetensors_is_a_clear_error(archive: Path) -> None:
    file = archive / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(SparseftError, match="damaged"):
        sparseft.load(archive)


def test_corrupted_safetensors_header_is_a_clear_error(archive: Path) -> None:
    file = archive / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:40] = b"\xff" * 32
    file.write_bytes(bytes(data))
    with pytest.raises(SparseftError, match="damaged"):
        sparseft.api.info(archive)


def test_index_naming_a_missing_file_is_a_clear_error(archive: Path) -> None:
    tensors = load_file(str(archive / "model.safetensors"))
    (archive / "model.safetensors").unlink()
    save_file(tensors, str(archive / "model-00001-of-00002.safetensors"))
    weight_map = dict.fromkeys(tensors, "model-00001-of-00002.safetensors")
    weight_map["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (archive / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    with pytest.raises(SparseftError, match="model-00002-of-00002.safetensors, which is missing"):
        sparseft.load(archive)


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


def test_unknown_format_is_a_clear_error(
    archive: Path, make_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    config = read_config(archive)
    (archive / "config.json").write_text(json.dumps({**config, "format": "zipped-weights"}))
    with pytest.raises(SparseftError, match="unknown format 'zipped-weights'"):
        sparseft.load(archive)
    with pytest.raises(SparseftError, match="unknown export format"):
        sparseft.export(str(make_model_dir("llama", hidden=60)), tmp_path / "x", "onnx")
    with pytest.raises(SparseftError, match="unknown quantization"):
        sparseft.export(str(make_model_dir("llama", hidden=60)), tmp_path / "x", "bitmask", "int3")
    assert not (tmp_path / "x").exists()


def test_a_failure_while_writing_leaves_no_output(
    make_model_dir: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def failing(matrix: torch.Tensor, quantized: object = None) -> dict:
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk full")
        return original(matrix, quantized)

    original = formats.compress
    monkeypatch.setattr(formats, "compress", failing)
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


def _tiny_t5(path: Path) -> Path:
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, decoder_start_token_id=0
    )
    transformers.T5ForConditionalGeneration(config).save_pretrained(path)
    return path


def test_t5_in_float16_round_trips_with_its_fp32_feed_forward_outputs(tmp_path: Path) -> None:
    # T5 keeps each feed-forward `wo` in fp32 when loaded in fp16 (its _keep_in_fp32_modules)
    _tiny_t5(tmp_path / "t5")
    sparseft.export(str(tmp_path / "t5"), tmp_path / "archive", "bitmask", dtype="float16", progress=False)
    source = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "t5", dtype=torch.float16)
    assert source.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    loaded = sparseft.load(tmp_path / "archive")
    for name, tensor in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name].float(), tensor.float(), rtol=0, atol=0)


def test_a_config_without_architectures_builds_the_model_of_its_kind(tmp_path: Path) -> None:
    _tiny_t5(tmp_path / "t5")
    sparseft.export(str(tmp_path / "t5"), tmp_path / "archive", "bitmask", progress=False)
    meta = read_config(tmp_path / "archive")
    del meta["model_config"]["architectures"]
    (tmp_path / "archive" / "config.json").write_text(json.dumps(meta))
    assert isinstance(sparseft.load(tmp_path / "archive"), transformers.T5ForConditionalGeneration)
    assert isinstance(runtime.load(tmp_path / "archive"), transformers.T5ForConditionalGeneration)


def test_gptq_export_of_an_encoder_decoder_is_refused_in_one_line(tmp_path: Path, text_file: Path) -> None:
    with pytest.raises(SparseftError, match="use --method rtn"):
        sparseft.export(
            str(_tiny_t5(tmp_path / "t5")), tmp_path / "g", "bitmask", "int8", method="gptq",
            dataset=str(text_file), num_samples=2, seqlen=16, progress=False,
        )  # fmt: skip
    assert not (tmp_path / "g").exists()


def test_gptq_export_needs_a_positive_seqlen(
    make_model_dir: Callable[..., Path], tmp_path: Path, text_file: Path
) -> None:
    with pytest.raises(SparseftError, match="at least 1"):
        sparseft.export(
            str(make_model_dir("llama")), tmp_path / "g", "bitmask", "int8", method="gptq",
            dataset=str(text_file), seqlen=0, progress=False,
        )  # fmt: skip


def test_compressed_tensors_features_sparseft_does_not_read_are_refused(
    make_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    source = make_model_dir("llama", hidden=64)
    sparseft.export(str(source), tmp_path / "q", "hf", "int4", group_size=32, progress=False)
    config = read_config(tmp_path / "q")
    weights = config["quantization_config"]["config_groups"]["group_0"]["weights"]
    for change in ({"actorder": "group"}, {"strategy": "tensor"}):
        edited = json.loads(json.dumps(config))
        edited["quantization_config"]["config_groups"]["group_0"]["weights"] = {**weights, **change}
        (tmp_path / "q" / "config.json").write_text(json.dumps(edited))
        with pytest.raises(SparseftError, match="sparseft reads channel or group scales"):
            sparseft.load(tmp_path / "q")
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight_g_idx"] = torch.zeros(64, dtype=torch.int32)
    save_file(tensors, str(tmp_path / "q" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SparseftError, match="weight_g_idx, which sparseft does not read"):
        sparseft.load(tmp_path / "q")


def test_a_sparsity_only_compressed_tensors_config_reads_as_a_plain_checkpoint(
    make_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    source = make_model_dir("llama")
    out = tmp_path / "dense"
    out.mkdir()
    for file in source.iterdir():
        (out / file.name).write_bytes(file.read_bytes())
    config = read_config(out)
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "dense",
        "sparsity_config": {"format": "dense", "global_sparsity": 0.5},
    }
    (out / "config.json").write_text(json.dumps(config))
    assert formats.detect(out) == "hf"
