import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

import sparseft
from sparseft import runtime
from sparseft.errors import SparseftError
from tests.helpers import read_config, tiny_t5


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


def test_t5_in_float16_round_trips_with_its_fp32_feed_forward_outputs(tmp_path: Path) -> None:
    # T5 keeps each feed-forward `wo` in fp32 when loaded in fp16 (its _keep_in_fp32_modules)
    tiny_t5(tmp_path / "t5")
    sparseft.export(str(tmp_path / "t5"), tmp_path / "archive", "bitmask", dtype="float16", progress=False)
    source = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "t5", dtype=torch.float16)
    assert source.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    loaded = sparseft.load(tmp_path / "archive")
    for name, tensor in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name].float(), tensor.float(), rtol=0, atol=0)


def test_a_config_without_architectures_builds_the_model_of_its_kind(tmp_path: Path) -> None:
    tiny_t5(tmp_path / "t5")
    sparseft.export(str(tmp_path / "t5"), tmp_path / "archive", "bitmask", progress=False)
    meta = read_config(tmp_path / "archive")
    del meta["model_config"]["architectures"]
    (tmp_path / "archive" / "config.json").write_text(json.dumps(meta))
    assert isinstance(sparseft.load(tmp_path / "archive"), transformers.T5ForConditionalGeneration)
    assert isinstance(runtime.load(tmp_path / "archive"), transformers.T5ForConditionalGeneration)
