import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import sparseft
from sparseft import formats
from sparseft.errors import SparseftError
from sparseft.hf import find_targets, weight_matrix
from tests.helpers import read_config


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
