"""Measuring helpers, and `sparseft generate` / `sparseft bench` end to end on a pruned, exported tiny model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from sparseft import api
from sparseft.cli import main
from sparseft.runtime.bench import copy_bandwidth, measure_generation, model_bytes


def test_model_bytes_counts_shared_tensors_once(pruned_model: Callable[..., torch.nn.Module]) -> None:
    untied = pruned_model()
    tied = pruned_model(tie_word_embeddings=True)
    tied.tie_weights()
    embedding = untied.get_input_embeddings().weight
    assert model_bytes(untied) - model_bytes(tied) == embedding.numel() * embedding.element_size()


def test_measure_generation_side_by_side(pruned_model: Callable[..., torch.nn.Module]) -> None:
    result = measure_generation({"a": pruned_model(), "b": pruned_model(sparsity=0.5)}, 6, 3, runs=1)
    assert result["_machine"]["threads"] == torch.get_num_threads()
    assert copy_bandwidth(8, 1) > 0
    for name in ("a", "b"):
        assert result[name]["prefill_tok_s"] > 0 and result[name]["decode_tok_s"] > 0


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, make_model_dir: Callable[..., Path]) -> Path:
    root = tmp_path_factory.mktemp("runtime-cli")
    api.prune(str(make_model_dir("llama")), root / "pruned", method="magnitude", sparsity=0.7, progress=False)
    api.export(str(root / "pruned"), root / "archive", dtype="bfloat16", progress=False)
    return root / "archive"


def test_generate_command(exported: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(exported), "--prompt", "def main(", "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    assert "6 tokens in" in captured.err
    sparse = api.generate(exported, "def main(", max_new_tokens=6)
    assert captured.out.strip() == sparse["text"].strip()  # greedy: the same text every time


def test_bench_command(exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    args = [
        "bench",
        str(exported),
        "--prompt-tokens",
        "8",
        "--new-tokens",
        "3",
        "--runs",
        "1",
        "--output",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "sparse bf16" in printed and "dense bf16" in printed
    results = json.loads(out.read_text())["results"]
    assert results["sparse bf16"]["model_bytes"] < results["dense bf16"]["model_bytes"]


def test_bad_arguments(exported: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(exported), "--prompt", "x", "--max-new-tokens", "0"]) == 2
    assert main(["bench", str(exported), "--new-tokens", "1"]) == 2
    assert main(["generate", str(exported.parent / "missing"), "--prompt", "x"]) == 2
    assert "error" in capsys.readouterr().err
