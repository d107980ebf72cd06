"""Measuring helpers, and `sparseft generate` / `sparseft bench` end to end on pruned, exported tiny models:
a Llama, a T5 and a Whisper."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

from sparseft import api
from sparseft.cli import main
from sparseft.errors import SparseftError
from sparseft.runtime.bench import copy_bandwidth, measure_generation, model_bytes, seq2seq_inputs
from tests.helpers import save_t5, save_whisper


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


def test_measure_generation_makes_every_token_even_past_an_eos(
    pruned_model: Callable[..., torch.nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = pruned_model()
    # the random prompt measure_generation makes, and its first greedy token made the EOS
    prompt = torch.randint(
        0, int(model.config.vocab_size), (1, 6), generator=torch.Generator().manual_seed(0)
    )
    with torch.inference_mode():
        first = model.generate(prompt, max_new_tokens=1, do_sample=False, pad_token_id=0)[0, -1].item()
        model.generation_config.eos_token_id = first
        assert model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0).shape[1] == 6 + 1
    lengths: list[int] = []
    generate = model.generate

    def recorded(*args: object, **kwargs: object) -> torch.Tensor:
        out = generate(*args, **kwargs)
        lengths.append(out.shape[1])
        return out

    monkeypatch.setattr(model, "generate", recorded)
    measure_generation({"m": model}, 6, 5, runs=1)
    assert lengths[-2:] == [6 + 1, 6 + 5]  # prefill run, then the full run


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


def test_bench_says_the_bits_read_per_weight(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bits = {}
    for values in ("bf16", "int8", "int4"):
        out = tmp_path / f"{values}.json"
        run = ["bench", str(exported), "--values", values, "--prompt-tokens", "8", "--new-tokens", "3"]
        assert main([*run, "--runs", "1", "--json", str(out)]) == 0
        assert "bits/weight" in capsys.readouterr().out
        results = json.loads(out.read_text())["results"]
        assert results["dense bf16"]["bits_per_weight"] == 16
        bits[values] = results[f"sparse {values}"]["bits_per_weight"]
    assert bits["int4"] < bits["int8"] < bits["bf16"] < 16


def test_bad_arguments(exported: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(exported), "--prompt", "x", "--max-new-tokens", "0"]) == 2
    assert main(["bench", str(exported), "--new-tokens", "1"]) == 2
    assert main(["generate", str(exported.parent / "missing"), "--prompt", "x"]) == 2
    assert "error" in capsys.readouterr().err
    # past the model's positions: refused before anything runs, not an IndexError from inside its embeddings
    assert main(["bench", str(exported), "--prompt-tokens", "100000", "--runs", "1"]) == 2
    assert main(["generate", str(exported), "--prompt", "x", "--max-new-tokens", "100000"]) == 2
    assert capsys.readouterr().err.count("max_position_embeddings") == 2


# --- encoder-decoders: T5 and Whisper ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encdec(
    tmp_path_factory: pytest.TempPathFactory, tokenizer: transformers.PreTrainedTokenizerFast
) -> dict[str, Path]:
    """Tiny T5 and Whisper pruned to 70% by magnitude and exported as bitmask archives."""
    root = tmp_path_factory.mktemp("encdec-bench")
    archives = {}
    for family, save in (("t5", save_t5), ("whisper", save_whisper)):
        save(root / family, tokenizer)
        api.prune(str(root / family), root / f"{family}-70", method="magnitude", sparsity=0.7, progress=False)
        api.export(str(root / f"{family}-70"), root / f"{family}-archive", dtype="bfloat16", progress=False)
        archives[family] = root / f"{family}-archive"
    return archives


def test_seq2seq_inputs_are_made_once_in_the_model_shape() -> None:
    t5 = transformers.T5Config(vocab_size=50)
    whisper = transformers.WhisperConfig(num_mel_bins=80, max_source_positions=1500)
    inputs, described = seq2seq_inputs(t5, sentences=3, source_tokens=5)
    assert described == {"sentences": 3, "source_tokens": 5}
    assert [x["input_ids"].shape for x in inputs] == [(1, 5)] * 3
    assert len({x["input_ids"].untyped_storage().data_ptr() for x in inputs}) == 1  # views of one tensor
    inputs, described = seq2seq_inputs(whisper)
    assert described == {"audio_seconds": 30.0}
    (features,) = (x["input_features"] for x in inputs)
    assert features.shape == (1, 80, 3000) and features.dtype == torch.bfloat16


@pytest.mark.parametrize("family", ["t5", "whisper"])
def test_bench_encoder_decoder(encdec: dict[str, Path], family: str) -> None:
    report = api.bench(encdec[family], new_tokens=3, runs=1, sentences=2, source_tokens=6)
    assert report["kind"] == {"t5": "translation", "whisper": "speech"}[family]
    assert report["num_beams"] == {"t5": 5, "whisper": 1}[family] and report["new_tokens"] == 3
    results = report["results"]
    assert set(results) == {"sparse bf16", "dense bf16", "_machine"}
    for row in (results["sparse bf16"], results["dense bf16"]):
        assert row["encoder_ms"] > 0 and row["decode_tok_s"] > 0 and row["job_s"] > 0
        assert row["peak_bytes"] is None or row["peak_bytes"] >= row["model_bytes"]
    assert results["sparse bf16"]["model_bytes"] < results["dense bf16"]["model_bytes"]
    assert results["_machine"]["copy_gb_s"] > 0
    clock = results["_machine"]["clock_ghz"]
    assert clock is None or clock > 0


def test_bench_command_on_whisper_with_beams(
    encdec: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", str(encdec["whisper"]), "--new-tokens", "2", "--runs", "1", "--num-beams", "2"]
    assert main([*args, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "encoder ms" in printed and "sparse bf16" in printed and "dense bf16" in printed
    report = json.loads(out.read_text())
    assert report["num_beams"] == 2 and report["audio_seconds"] == 2.0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_beams": 0}, "num_beams >= 1, got 0"),
        ({"sentences": 0}, "sentences >= 1, got 0"),
        ({"new_tokens": 61}, "at most 60 new tokens"),
    ],
)
def test_bench_rejects_bad_encoder_decoder_settings(
    encdec: dict[str, Path], options: dict[str, int], message: str
) -> None:
    with pytest.raises(SparseftError, match=message):
        api.bench(encdec["whisper"], runs=1, **options)


def test_bench_rejects_a_missing_model(tmp_path: Path) -> None:
    with pytest.raises(SparseftError, match="not a directory"):
        api.bench(tmp_path / "missing")


def test_result_files_are_named_by_benchmark_date_and_machine() -> None:
    from sparseft.runtime.bench import cpu_name, result_path

    path = result_path("cpu_decode")
    name = path.removeprefix("benchmarks/results/cpu_decode_").removesuffix(".json")
    date, _, machine = name.partition("_")
    assert len(date) == 15 and date[4] == date[7] == date[10] == "-"  # 2026-12-07-0215
    assert machine and all(c.isalnum() or c == "-" for c in machine) and "--" not in machine
    assert cpu_name().rsplit(", ", 1)[1] in ("avx512", "avx2", "other")
