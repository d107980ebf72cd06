import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

import sparseft
from sparseft.errors import SparseftError
from sparseft.hf import find_targets, weight_matrix
from sparseft.pruning.magnitude import magnitude_prune
from sparseft.quant.model import quantize_model
from sparseft.quant.spec import QuantSpec
from tests.helpers import pruned_dir, tiny_t5


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


def test_gptq_export_of_an_encoder_decoder_is_refused_in_one_line(tmp_path: Path, text_file: Path) -> None:
    with pytest.raises(SparseftError, match="use --quant-method rtn"):
        sparseft.export(
            str(tiny_t5(tmp_path / "t5")), tmp_path / "g", "bitmask", "int8", method="gptq",
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


def test_quantize_model_rtn_replaces_weights_by_their_dequantized_values(
    make_model_dir: Callable[..., Path],
) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(make_model_dir("llama"))
    targets = find_targets(model)
    for module in targets.values():
        weight_matrix(module).copy_(magnitude_prune(weight_matrix(module), 0.5))
    before = {name: weight_matrix(m).clone() for name, m in targets.items()}
    quantized, errors = quantize_model(model, targets, QuantSpec(4, 32))

    assert quantized.keys() == targets.keys() == errors.keys()
    for name, module in targets.items():
        weight = weight_matrix(module)
        assert torch.equal(weight, quantized[name].dequantize(weight.dtype))
        assert bool((weight[before[name] == 0] == 0).all())
        assert not torch.equal(weight, before[name])
        assert 0 < errors[name]["rtn_weight_error"] < 0.05
    with pytest.raises(SparseftError, match="calibration data"):
        quantize_model(model, targets, QuantSpec(8), "gptq")
