import math
from collections.abc import Callable
from pathlib import Path

import pytest

import sparseft
from sparseft.cli import main
from tests.helpers import pruned_dir


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
