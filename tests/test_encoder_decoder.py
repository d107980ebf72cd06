"""T5 and Whisper end to end: prune through `sparseft.prune`, SquareHead over encoder and decoder, a short sparse
fine-tuning run, BLEU and WER of the results (the metrics themselves: tests/eval/test_seq2seq.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sacrebleu
import torch
import transformers

import sparseft
from sparseft import api
from sparseft.cli import main
from sparseft.data.batch import collate
from sparseft.data.seq2seq import PairSource, load_examples
from sparseft.errors import SparseftError
from sparseft.eval.seq2seq import wer
from sparseft.finetuning.losses import LossWeights, distill_terms
from sparseft.hf import find_targets
from tests.helpers import encoding, save_t5, save_whisper, write_pairs, write_speech


@pytest.fixture(scope="module")
def workdir(
    tmp_path_factory: pytest.TempPathFactory, tokenizer: transformers.PreTrainedTokenizerFast
) -> Path:
    """Tiny T5 and Whisper directories, translation pairs and speech clips, made once for this module."""
    root = tmp_path_factory.mktemp("seq2seq")
    save_t5(root / "t5", tokenizer)
    save_whisper(root / "whisper", tokenizer)
    write_pairs(root / "pairs.jsonl", 12)
    write_speech(root / "speech", 6)
    return root


def pair_options(root: Path) -> dict[str, str]:
    return {"dataset": str(root / "pairs.jsonl"), "source_lang": "en", "target_lang": "de"}


def speech_options(root: Path) -> dict[str, str]:
    return {"dataset": str(root / "speech" / "speech.jsonl")}


def load(path: Path) -> torch.nn.Module:
    config = transformers.AutoConfig.from_pretrained(path)
    if config.model_type == "whisper":
        return transformers.WhisperForConditionalGeneration.from_pretrained(path).eval()
    return transformers.T5ForConditionalGeneration.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def pruned(workdir: Path) -> dict[str, Path]:
    """Both models pruned to 50% by SparseGPT through the API, calibrated on their own kind of data."""
    api.prune(str(workdir / "t5"), workdir / "t5-50", method="sparsegpt", sparsity=0.5, num_samples=8,
              progress=False, **pair_options(workdir))  # fmt: skip
    api.prune(str(workdir / "whisper"), workdir / "whisper-50", method="sparsegpt", sparsity=0.5, num_samples=4,
              progress=False, **speech_options(workdir))  # fmt: skip
    return {"t5": workdir / "t5-50", "whisper": workdir / "whisper-50"}


@pytest.mark.parametrize("family", ["t5", "whisper"])
def test_prune_hits_target_in_encoder_and_decoder(
    workdir: Path, pruned: dict[str, Path], family: str
) -> None:
    dense, sparse = load(workdir / family), load(pruned[family])
    targets = find_targets(sparse)
    cross = [n for n in targets if "EncDecAttention" in n or "encoder_attn" in n]
    assert cross and any(n.startswith(("encoder.", "model.encoder.")) for n in targets)
    assert any(n.startswith(("decoder.", "model.decoder.")) for n in targets)
    for name, module in targets.items():
        assert float((module.weight == 0).float().mean()) == 0.5, name
    names = {f"{n}.weight" for n in targets}
    before = dense.state_dict()
    untouched = [n for n in sparse.state_dict() if n not in names]
    assert any("embed" in n or "shared" in n for n in untouched)
    if family == "whisper":
        assert (
            "model.encoder.conv1.weight" in untouched and "model.encoder.embed_positions.weight" in untouched
        )
    for name in untouched:
        assert torch.equal(sparse.state_dict()[name], before[name]), name

    report = json.loads((pruned[family] / "sparsity.json").read_text())
    assert report["targets_sparsity"] == 0.5 and report["calibration"]["dataset"].endswith(".jsonl")
    if family == "whisper":  # the feature extractor travels with the weights
        assert (pruned[family] / "preprocessor_config.json").is_file()


def test_prune_from_the_command_line(workdir: Path, tmp_path: Path) -> None:
    out = tmp_path / "t5-wanda"
    args = ["prune", str(workdir / "t5"), "-o", str(out), "--method", "wanda", "--sparsity", "0.25",
            "--dataset", str(workdir / "pairs.jsonl"), "--source-lang", "en", "--target-lang", "de",
            "--num-samples", "4"]  # fmt: skip
    assert main(args) == 0
    assert json.loads((out / "sparsity.json").read_text())["targets_sparsity"] == 0.25


def test_prune_whisper_in_bf16(workdir: Path, tmp_path: Path) -> None:
    """Audio features follow the model's dtype: a bf16 Whisper's convolution stem refuses float32 input."""
    out = tmp_path / "whisper-bf16"
    args = ["prune", str(workdir / "whisper"), "-o", str(out), "--method", "wanda", "--sparsity", "0.5",
            "--dataset", str(workdir / "speech" / "speech.jsonl"), "--num-samples", "2", "--dtype", "bfloat16"]  # fmt: skip
    assert main(args) == 0
    assert json.loads((out / "sparsity.json").read_text())["targets_sparsity"] == 0.5


def test_prune_rejects_bad_pairs_before_pruning(
    workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SparseftError, match="no 'fr' translation"):
        api.prune(str(workdir / "t5"), tmp_path / "x", method="wanda", progress=False,
                  **{**pair_options(workdir), "target_lang": "fr"})  # fmt: skip
    assert not (tmp_path / "x").exists()
    code = main(["prune", str(workdir / "whisper"), "-o", str(tmp_path / "y"), "--method", "wanda",
                 "--dataset", str(workdir / "pairs.jsonl")])  # fmt: skip
    assert code == 2 and "no field 'audio'" in capsys.readouterr().err


def hand_squarehead(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    s, t = student[mask.bool()], teacher[mask.bool()]  # (kept tokens, hidden)
    return ((s - t) ** 2).mean() / ((t**2).mean() + 1e-8)


def batch_and_outputs(
    workdir: Path, family: str, student: torch.nn.Module, teacher: torch.nn.Module, n: int = 3
) -> tuple[dict[str, torch.Tensor], object, object]:
    """The first `n` examples of the family's data as one padded batch, and both models' outputs on it."""
    source = PairSource(**(pair_options(workdir) if family == "t5" else speech_options(workdir)))
    examples = load_examples(source, encoding(workdir / family, source))[:n]
    batch = collate(examples, pad_id=int(teacher.config.pad_token_id))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return (
            batch,
            student(**inputs, output_hidden_states=True),
            teacher(**inputs, output_hidden_states=True),
        )


@pytest.mark.parametrize("family", ["t5", "whisper"])
def test_squarehead_sums_encoder_and_decoder_terms(
    workdir: Path, pruned: dict[str, Path], family: str
) -> None:
    batch, s_out, t_out = batch_and_outputs(workdir, family, load(pruned[family]), load(workdir / family))
    terms = distill_terms(s_out, t_out, batch, LossWeights(ce=1.0, squarehead=1.0))

    encoder_mask = batch.get("attention_mask", torch.ones(s_out.encoder_hidden_states[0].shape[:2]))
    decoder_mask = batch["labels"] != -100
    assert not decoder_mask.all()  # padding is present and must be left out
    pairs = [
        *(
            (s, t, encoder_mask)
            for s, t in zip(s_out.encoder_hidden_states[1:], t_out.encoder_hidden_states[1:], strict=True)
        ),
        *(
            (s, t, decoder_mask)
            for s, t in zip(s_out.decoder_hidden_states[1:], t_out.decoder_hidden_states[1:], strict=True)
        ),
    ]
    assert len(pairs) == 4  # two encoder blocks, two decoder blocks
    by_hand = torch.stack([hand_squarehead(s, t, mask) for s, t, mask in pairs]).sum()
    torch.testing.assert_close(terms["squarehead"], by_hand)
    ce = torch.nn.functional.cross_entropy(
        s_out.logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100
    )
    torch.testing.assert_close(terms["ce"], ce)


def zero_positions(path: Path) -> dict[str, torch.Tensor]:
    model = load(path)
    return {n: m.weight == 0 for n, m in find_targets(model).items()}


@pytest.mark.parametrize("family", ["t5", "whisper"])
def test_sparse_finetuning_keeps_masks_and_lowers_the_loss(
    workdir: Path, pruned: dict[str, Path], family: str, tmp_path: Path
) -> None:
    data = pair_options(workdir) if family == "t5" else speech_options(workdir)
    fields = {f"data__{k}": v for k, v in data.items() if k != "dataset"}
    summary = api.finetune(
        str(pruned[family]), tmp_path / "run", teacher=str(workdir / family), dataset=data["dataset"],
        loss="squarehead", progress=False, loss__ce=1.0 if family == "t5" else 0.5,
        data__format="translation" if family == "t5" else "speech", data__seqlen=32, **fields,
        train__max_steps=10, train__lr=6e-3, train__micro_batch_size=6, train__warmup_steps=0, train__save_every=100,
    )  # fmt: skip
    assert set(summary["history"][0]) >= {"ce", "squarehead"}
    weights = LossWeights(ce=1.0 if family == "t5" else 0.5, squarehead=1.0)
    teacher = load(workdir / family)
    losses = []
    for student in (
        pruned[family],
        Path(summary["model"]),
    ):  # the loss on the same 6 examples, before and after
        batch, s_out, t_out = batch_and_outputs(workdir, family, load(student), teacher, n=6)
        losses.append(float(distill_terms(s_out, t_out, batch, weights)["loss"]))
    assert losses[1] < 0.95 * losses[0], losses
    before, after = zero_positions(pruned[family]), zero_positions(Path(summary["model"]))
    for name, zeros in before.items():
        assert torch.equal(after[name], zeros), name  # exactly the pruned entries are zero, no more, no fewer
    if family == "whisper":
        assert (Path(summary["model"]) / "preprocessor_config.json").is_file()


@pytest.mark.parametrize("family", ["t5", "whisper"])
def test_eval_scores_generated_text(
    workdir: Path, pruned: dict[str, Path], family: str, tmp_path: Path
) -> None:
    task = "bleu" if family == "t5" else "wer"
    data = pair_options(workdir) if family == "t5" else speech_options(workdir)
    out = tmp_path / "result.json"
    result = api.evaluate(
        str(pruned[family]), task, output=out, limit=4, max_new_tokens=6, progress=False, **data
    )
    hypotheses = [s["hypothesis"] for s in result["samples"]]
    references = [s["reference"] for s in result["samples"]]
    assert len(hypotheses) == 4 and all(references)
    if task == "bleu":
        assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score)
        assert result["protocol"]["generation"] == "beam search, 5 beams"
        assert result["protocol"]["source_prefix"] == "translate English to German: "
    else:
        assert result["wer"] == pytest.approx(wer(hypotheses, references)["wer"])
    assert json.loads(out.read_text())[task] == result[task]


def test_a_seq2seq_eval_config_gives_what_its_keywords_give(workdir: Path, pruned: dict[str, Path]) -> None:
    settings = {**pair_options(workdir), "limit": 2, "max_new_tokens": 4, "num_beams": 2}
    by_keywords = api.eval_seq2seq(str(pruned["t5"]), "bleu", progress=False, **settings)
    config = sparseft.Seq2SeqEvalConfig(**settings)
    by_config = api.eval_seq2seq(str(pruned["t5"]), "bleu", config=config, progress=False)
    assert by_config == by_keywords


@pytest.mark.parametrize("family", ["t5", "whisper"])
def test_scores_of_a_bitmask_export_on_the_runtime(
    pruned: dict[str, Path], workdir: Path, tmp_path: Path, family: str
) -> None:
    sparseft.export(str(pruned[family]), tmp_path / "archive", format="bitmask", progress=False)
    task, data = ("bleu", pair_options(workdir)) if family == "t5" else ("wer", speech_options(workdir))
    options: dict[str, Any] = {"limit": 2, "max_new_tokens": 4, "progress": False, **data}
    from_archive = api.evaluate(str(tmp_path / "archive"), task, runtime=True, **options)
    from_checkpoint = api.evaluate(str(pruned[family]), task, runtime=True, **options)
    assert from_archive[task] == from_checkpoint[task]


@pytest.mark.parametrize("num_beams", [1, 2])
def test_wer_on_the_sparse_runtime(pruned: dict[str, Path], workdir: Path, num_beams: int) -> None:
    # the runtime's own Whisper, beam search included
    result = api.evaluate(str(pruned["whisper"]), "wer", runtime=True, limit=2, max_new_tokens=4, progress=False,
                          num_beams=num_beams, **speech_options(workdir))  # fmt: skip
    assert result["protocol"]["runtime"] and len(result["samples"]) == 2
    assert result["protocol"]["generation"] == ("greedy" if num_beams == 1 else "beam search, 2 beams")


def test_eval_cli_and_wrong_model_kind(
    workdir: Path, pruned: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["eval", str(pruned["t5"]), "--task", "bleu", "--dataset", str(workdir / "pairs.jsonl"),
                 "--source-lang", "en", "--target-lang", "de", "--limit", "2", "--max-new-tokens", "4",
                 "--num-beams", "2"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0 and json.loads(printed)["protocol"]["generation"] == "beam search, 2 beams"
    assert main(["eval", str(pruned["t5"]), "--task", "wer", "--dataset", str(workdir / "pairs.jsonl")]) == 2
    assert "wer scores a speech model" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["t5", "whisper"])
def test_bitmask_export_round_trips(pruned: dict[str, Path], tmp_path: Path, family: str) -> None:
    sparseft.export(str(pruned[family]), tmp_path / "archive", format="bitmask")
    loaded = sparseft.load(tmp_path / "archive")
    original = load(pruned[family])
    assert type(loaded) is type(original)
    want = original.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, want[name]), name
