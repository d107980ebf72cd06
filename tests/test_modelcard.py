"""The model card every prune, export and finetune output carries: its front matter, and a body that tells only
what the saved files show (sparsity measured from the weights, evaluations only when their JSON is there)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import transformers
import yaml

import sparseft
from sparseft import api, modelcard
from sparseft.finetuning.stages import REPORT_FILE
from sparseft.hf import find_targets, weight_matrix
from tests.helpers import save_t5, save_whisper

SOURCE_CARD = """---
license: apache-2.0
base_model: someone/original
tags: [text-generation, code]
---
# The source's own card

Nothing of this text belongs in a sparseft card.
"""


def card(directory: Path) -> tuple[dict[str, Any], str]:
    """The front matter (parsed by PyYAML, as the Hub does) and the body of a directory's card."""
    text = (directory / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    meta = yaml.safe_load(head)
    assert isinstance(meta, dict)
    return meta, body


def zeros_of(model: Any) -> tuple[float, dict[str, float]]:
    """Sparsity of the prune targets of a loaded model, overall and per linear name (q_proj, up_proj, ...)."""
    zeros: dict[str, list[int]] = {}
    for name, module in find_targets(model).items():
        weight = weight_matrix(module)
        counts = zeros.setdefault(name.rsplit(".", 1)[-1], [0, 0])
        counts[0] += int((weight == 0).sum())
        counts[1] += weight.numel()
    overall = sum(z for z, _ in zeros.values()) / sum(n for _, n in zeros.values())
    return overall, {name: z / n for name, (z, n) in zeros.items()}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, make_model_dir: Callable[..., Path]) -> Path:
    """The tiny Llama with a Hub-style card of its own (license apache-2.0)."""
    path = tmp_path_factory.mktemp("source") / "tiny-llama"
    shutil.copytree(make_model_dir("llama"), path)
    (path / "README.md").write_text(SOURCE_CARD)
    return path


@pytest.fixture(scope="module")
def pruned(source: Path, text_file: Path) -> Path:
    """`source` pruned 2:4 by Wanda on 4 calibration sequences."""
    out = source.parent / "pruned-24"
    sparseft.prune(str(source), out, method="wanda", structure="2:4", dataset=str(text_file), num_samples=4,
                   seqlen=32, progress=False)  # fmt: skip
    return out


def test_prune_writes_a_card_with_the_measured_sparsity(source: Path, pruned: Path) -> None:
    meta, body = card(pruned)
    assert meta["base_model"] == str(source) and meta["library_name"] == "sparseft"
    assert meta["license"] == "apache-2.0"  # carried from the source's card
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["sparse", "pruned"]
    overall, per_name = zeros_of(transformers.AutoModelForCausalLM.from_pretrained(pruned))
    assert f"{overall:.2%} of the" in body
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"| self_attn.{name} | attention | 2 |" in body and f"{per_name[name]:.2%} |" in body
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert f"| mlp.{name} | MLP | 2 |" in body
    assert "Wanda to 50%, 2:4 structure" in body and "4 sequences of 32 tokens" in body
    assert f"sparseft generate {pruned} --prompt" in body and f"sparseft serve {pruned}" in body
    assert f'runtime.load("{pruned}")' in body
    assert "arXiv:2310.06927" in body and "Kurtic, Eldar" in body
    assert "source's own card" not in body  # ours replaces the source's card, only its license stays
    assert "Evaluation" not in body and "perplexity" not in body.lower()


def test_the_card_measures_the_weights_not_the_report(pruned: Path, tmp_path: Path) -> None:
    out = tmp_path / "tampered"
    shutil.copytree(pruned, out)
    weights = transformers.AutoModelForCausalLM.from_pretrained(out)
    weights.model.layers[0].mlp.up_proj.weight.data.zero_()  # the report still says 50%
    weights.save_pretrained(out)
    modelcard.write_card(out, str(pruned), out)
    _, body = card(out)
    overall, per_name = zeros_of(weights)
    assert overall > 0.5 and f"{overall:.2%} of the" in body
    assert (
        per_name["up_proj"] == pytest.approx(0.75) and "| mlp.up_proj | MLP | 2 | 16,384 | 75.00% |" in body
    )


def test_export_bitmask_int8_card(source: Path, pruned: Path, tmp_path: Path) -> None:
    out = tmp_path / "int8"
    sparseft.export(str(pruned), out, format="bitmask", quantize="int8", progress=False)
    meta, body = card(out)
    assert meta["base_model"] == str(source)  # the model the chain started from, not the pruned directory
    assert meta["license"] == "apache-2.0"
    assert meta["tags"] == ["sparse", "pruned", "int8", "bitmask"]
    overall, _ = zeros_of(api.load(out))
    assert overall >= 0.5 and f"{overall:.2%} of the" in body
    steps = body.split(modelcard.STEPS[0])[1].split(modelcard.STEPS[1])[0]
    assert "**Pruned** one-shot with Wanda" in steps and "quantized to int8 per output channel" in steps
    assert "Evaluation" not in body


def test_export_hf_int4_card(pruned: Path, tmp_path: Path) -> None:
    out = tmp_path / "int4"
    sparseft.export(str(pruned), out, format="hf", quantize="int4", group_size=32, progress=False)
    meta, body = card(out)
    assert meta["tags"] == ["sparse", "pruned", "int4", "compressed-tensors"]
    assert "int4 in groups of 32" in body and "vLLM serves" in body


def test_export_hf_unquantized_card(pruned: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    sparseft.export(str(pruned), out, format="hf", progress=False)
    meta, body = card(out)
    assert meta["tags"] == ["sparse", "pruned"]  # neither a quantization nor a format tag
    assert "with the zeros kept" in body and "plain Hugging Face checkpoint" in body


def test_a_dense_export_is_not_tagged_sparse_and_keeps_only_the_license(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "dense"
    sparseft.export(str(source), out, format="bitmask", progress=False)
    meta, body = card(out)
    assert meta["tags"] == ["bitmask"]
    assert meta["base_model"] == str(source)  # a foreign card's base_model is its own ancestry, not ours
    assert meta["license"] == "apache-2.0"
    assert "0.00% of the" in body and body.startswith("\n# tiny-llama\n")


def test_a_source_without_a_license_gives_none(make_model_dir: Callable[..., Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    sparseft.prune(str(make_model_dir("llama")), out, method="magnitude", sparsity=0.5, progress=False)
    meta, body = card(out)
    assert "license" not in meta
    assert "**Pruned** one-shot with magnitude to 50%, unstructured, no calibration data." in body


def test_finetune_card(source: Path, pruned: Path, tmp_path: Path) -> None:
    task = tmp_path / "add.jsonl"
    rows = [{"question": f"{a} + {b} =", "answer": f"{a + b}"} for a in range(4) for b in range(4)]
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sparseft.finetune(str(pruned), tmp_path / "run", teacher=str(source), dataset=str(task), train__max_steps=2,
                      train__micro_batch_size=2, train__warmup_steps=0, progress=False)  # fmt: skip
    out = tmp_path / "run" / "model"
    meta, body = card(out)
    assert meta["base_model"] == str(source) and meta["license"] == "apache-2.0"
    assert meta["tags"] == ["sparse", "pruned", "sparse-finetuned"]
    report = json.loads((out / REPORT_FILE).read_text())
    last = report["history"][-1]["loss"]
    assert "**Sparse fine-tuned** (stage `finetune`) for 2 steps with the pruning mask fixed" in body
    assert "1·CE + 1·SquareHead" in body and f"distilling from `{source}`" in body
    assert f"{last:.4g} at step 2" in body
    overall, _ = zeros_of(transformers.AutoModelForCausalLM.from_pretrained(out))
    assert f"{overall:.2%} of the" in body
    assert "Evaluation" not in body


def test_an_eval_result_saved_beside_the_card_joins_it(pruned: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned-24"
    shutil.copytree(pruned, out)
    other = {"task": "gsm8k", "model": "some/other-model", "accuracy": 0.987654, "total": 8}
    (out / "other.json").write_text(json.dumps(other))  # another model's result: not this card's
    result = sparseft.evaluate(str(out), task="ppl", dataset=str(text_file), seqlen=32, output=out / "ppl.json",
                               progress=False)  # fmt: skip
    meta, body = card(out)
    assert meta["tags"] == ["sparse", "pruned"]
    assert "## Evaluation" in body
    assert (
        f"| ppl | perplexity | {result['perplexity']:.4g} | {text_file}, test | PyTorch | `ppl.json` |"
        in body
    )
    assert "0.9877" not in body and "other.json" not in body
    assert body.count("## Citation") == 1 and body.count(modelcard.EVALUATION[0]) == 1


def test_a_card_reads_eval_files_already_in_its_directory(pruned: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned-24"
    shutil.copytree(pruned, out)
    result = {"task": "gsm8k", "model": str(out), "accuracy": 0.625, "total": 8, "runtime": True,
              "dataset": {"dataset": "mathtask", "config": None, "split": "test"}}  # fmt: skip
    (out / "gsm8k.json").write_text(json.dumps(result))
    modelcard.write_card(out, str(pruned), out)
    _, body = card(out)
    assert "| gsm8k | accuracy | 0.625 | mathtask, test | sparseft kernels | `gsm8k.json` |" in body


def test_a_foreign_card_is_never_rewritten_by_eval(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text(SOURCE_CARD)
    (tmp_path / "ppl.json").write_text(json.dumps({"task": "ppl", "model": str(tmp_path), "perplexity": 3.0}))
    assert not modelcard.refresh_evaluation(tmp_path)
    assert (tmp_path / "README.md").read_text() == SOURCE_CARD


@pytest.mark.parametrize(
    ("save", "pipeline", "row"),
    [
        (save_t5, "text2text-generation", "| encoder SelfAttention.q | attention | 2 |"),
        (save_whisper, "automatic-speech-recognition", "| decoder encoder_attn.q_proj | attention | 2 |"),
        (save_whisper, "automatic-speech-recognition", "| encoder fc1 | MLP | 2 | 4,096 | 50.00% |"),
    ],
)
def test_encoder_decoder_cards(
    save: Callable[..., Path],
    pipeline: str,
    row: str,
    tokenizer: transformers.PreTrainedTokenizerFast,
    tmp_path: Path,
) -> None:
    model = save(tmp_path / "model", tokenizer)
    sparseft.prune(str(model), tmp_path / "out", method="magnitude", sparsity=0.5, progress=False)
    meta, body = card(tmp_path / "out")
    assert meta["pipeline_tag"] == pipeline and meta["tags"] == ["sparse", "pruned"]
    assert row in body
    assert ("sparseft generate" in body) == (pipeline == "text2text-generation")
    assert "sparseft serve" not in body


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.layers.3.self_attn.q_proj.weight", ("self_attn.q_proj", "attention")),
        ("transformer.h.0.attn.c_proj.weight", ("attn.c_proj", "attention")),
        ("transformer.h.0.mlp.c_proj.weight", ("mlp.c_proj", "MLP")),
        ("gpt_neox.layers.1.attention.query_key_value.weight", ("attention.query_key_value", "attention")),
        ("transformer.blocks.0.ffn.up_proj.weight", ("ffn.up_proj", "MLP")),
        ("model.decoder.layers.1.fc1.weight", ("fc1", "MLP")),
        ("encoder.block.0.layer.1.DenseReluDense.wi.weight", ("DenseReluDense.wi", "MLP")),
    ],
)
def test_layer_types(name: str, expected: tuple[str, str]) -> None:
    assert modelcard.layer_type(name) == expected


def test_front_matter_that_is_missing_or_broken_reads_as_none() -> None:
    assert modelcard.parse_front_matter("# just a title\n") == {}
    assert modelcard.parse_front_matter("---\nlicense: [unclosed\n---\nbody") == {}
    assert modelcard.parse_front_matter(SOURCE_CARD)["license"] == "apache-2.0"


def test_a_hub_source_gives_its_card_and_a_failed_fetch_gives_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    (tmp_path / "README.md").write_text(SOURCE_CARD)
    fetched: list[tuple[str, str]] = []

    def download(repo_id: str, filename: str) -> str:
        fetched.append((repo_id, filename))
        return str(tmp_path / filename)

    monkeypatch.setattr(modelcard, "hf_hub_download", download)
    meta, body = modelcard.source_card("someone/model")
    assert fetched == [("someone/model", "README.md")]
    assert meta["license"] == "apache-2.0" and body.startswith("# The source's own card")

    def offline(repo_id: str, filename: str) -> str:
        raise huggingface_hub.errors.OfflineModeIsEnabled("offline")

    monkeypatch.setattr(modelcard, "hf_hub_download", offline)
    assert modelcard.source_card("someone/model") == ({}, "")


def test_the_finetune_report_name_is_the_one_train_writes() -> None:
    assert modelcard.FINETUNE_REPORT == REPORT_FILE
