import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import sparseft
from sparseft import api
from sparseft.cli import main
from sparseft.errors import SparseftError


def test_prune_writes_checkpoint_and_report(
    make_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "pruned"
    report = sparseft.prune(
        str(make_model_dir("llama")),
        out,
        method="sparsegpt",
        sparsity=0.7,
        dataset=str(text_file),
        num_samples=4,
        seqlen=32,
        seed=3,
        progress=False,
    )
    saved = json.loads((out / "sparsity.json").read_text())
    assert saved == report
    assert saved["method"] == "sparsegpt" and saved["structure"] == "unstructured"
    assert saved["calibration"]["seqlen"] == 32 and saved["calibration"]["seed"] == 3
    assert saved["calibration"]["dataset"] == str(text_file)
    assert saved["seconds"] >= 0
    assert all(layer["sparsity"] == pytest.approx(0.7, abs=1e-3) for layer in saved["layers"].values())
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert float((model.model.layers[0].mlp.up_proj.weight == 0).float().mean()) == pytest.approx(
        0.7, abs=1e-3
    )


def test_pruning_a_mixture_of_experts_says_the_experts_stay_dense(
    make_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    with pytest.warns(UserWarning, match="mixture-of-experts tensors .* stay dense"):
        report = sparseft.prune(
            str(make_model_dir("mixtral")), tmp_path / "out", method="magnitude", sparsity=0.5, progress=False
        )
    assert report["dense_fused_weights"] and all(".experts." in n for n in report["dense_fused_weights"])
    assert report["targets_sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_prune_from_a_recipe_with_flag_override(
    make_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"prune:\n  method: wanda\n  structure: '2:4'\n  dataset: {text_file}\n  num_samples: 2\n  seqlen: 16\n"
    )
    report = api.prune(str(make_model_dir("gpt2")), tmp_path / "o", recipe=recipe, seed=5, progress=False)
    assert report["method"] == "wanda" and report["structure"] == "2:4" and report["calibration"]["seed"] == 5


BAD_SETTINGS = [
    ({"sparsity": 1.0}, "sparsity must be in"),
    ({"sparsity": -0.1}, "sparsity must be in"),
    ({"dampening": float("nan")}, "finite number"),
    ({"structure": "4:4"}, "0 < N < M"),
    ({"structure": "2:3"}, "multiple of 3"),
    ({"structure": "2:4", "sparsity": 0.7}, "drop one of them"),
    ({"method": "random"}, "method"),
    ({"seqlen": 4096}, "longer than the model allows"),
    ({"targets": ["nothing_like_this"]}, "matches no linear"),
    ({"ignore": ["q_prj"]}, "ignore 'q_prj' matches no linear"),
    ({"targets": ["re:model.(layers"]}, "not a valid regular expression"),
    ({"text_field": "body"}, "no field 'body'"),
    ({"num_samples": 0}, "at least 1"),
    ({"unknown_key": 1}, "unknown_key"),
]


@pytest.mark.parametrize(("settings", "message"), BAD_SETTINGS)
def test_bad_settings_fail_clearly_and_write_nothing(
    make_model_dir: Callable[..., Path],
    text_file: Path,
    tmp_path: Path,
    settings: dict[str, object],
    message: str,
) -> None:
    base: dict[str, object] = {
        "method": "sparsegpt",
        "dataset": str(text_file),
        "num_samples": 2,
        "seqlen": 16,
    }
    with pytest.raises(SparseftError, match=message):
        api.prune(str(make_model_dir("llama")), tmp_path / "out", progress=False, **{**base, **settings})
    assert list(tmp_path.iterdir()) == []


def test_missing_model_dataset_and_calibration(make_model_dir: Callable[..., Path], tmp_path: Path) -> None:
    with pytest.raises(SparseftError, match="does not exist"):
        api.prune(str(tmp_path / "no-model"), tmp_path / "out", method="magnitude")
    with pytest.raises(SparseftError, match="does not exist"):
        api.prune(
            str(make_model_dir("llama")),
            tmp_path / "out",
            dataset=str(tmp_path / "none.jsonl"),
            progress=False,
        )
    with pytest.raises(SparseftError, match="needs calibration data"):
        api.prune(str(make_model_dir("llama")), tmp_path / "out", method="wanda")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_overwritten_by_default(
    make_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(SparseftError, match="already exists"):
        api.prune(str(make_model_dir("llama")), tmp_path / "out", method="magnitude")
    api.prune(
        str(make_model_dir("llama")), tmp_path / "out", method="magnitude", overwrite=True, progress=False
    )
    assert (tmp_path / "out" / "sparsity.json").exists()


def test_an_output_that_holds_an_input_is_refused(
    make_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    model = make_model_dir("llama")
    pruned = runs / "pruned"
    api.prune(str(model), pruned, method="magnitude", progress=False)
    for output in (runs, pruned):  # the output above its input, or the input itself
        with pytest.raises(SparseftError, match="which this run reads"):
            api.export(str(pruned), output, overwrite=True, progress=False)
        with pytest.raises(SparseftError, match="which this run reads"):
            api.prune(str(pruned), output, method="magnitude", overwrite=True, progress=False)
        with pytest.raises(SparseftError, match="which this run reads"):
            api.finetune(str(pruned), output, dataset=str(model), loss="ce", overwrite=True, progress=False)
    assert (pruned / "sparsity.json").exists()  # nothing deleted
    api.export(str(pruned), runs / "export", overwrite=True, progress=False)  # a sibling is fine


def test_perplexity_follows_the_protocol(
    make_model_dir: Callable[..., Path], text_file: Path, tokenizer: object
) -> None:
    path = make_model_dir("llama")
    result = api.eval_ppl(str(path), str(text_file), split="train", seqlen=64, progress=False)
    ids = torch.tensor(tokenizer("\n\n".join([text_file.read_text()]), add_special_tokens=False)["input_ids"])
    windows = ids.numel() // 64
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    nll = []
    with torch.no_grad():
        for w in ids[: windows * 64].view(windows, 64):
            logits = model(w[None]).logits[0, :-1]
            nll.append(torch.nn.functional.cross_entropy(logits, w[1:], reduction="none"))
    assert result["perplexity"] == pytest.approx(math.exp(torch.cat(nll).mean().item()), rel=1e-4)
    assert result["windows"] == windows and result["seqlen"] == 64 and result["split"] == "train"


def test_perplexity_of_an_archive_on_the_runtime(
    make_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    api.prune(str(make_model_dir("llama")), tmp_path / "pruned", method="magnitude", progress=False)
    api.export(str(tmp_path / "pruned"), tmp_path / "archive", "bitmask", dtype="bfloat16", progress=False)
    options: dict[str, object] = {"split": "train", "seqlen": 64, "progress": False}
    dense = api.eval_ppl(str(tmp_path / "pruned"), str(text_file), **options)
    sparse = api.eval_ppl(str(tmp_path / "archive"), str(text_file), runtime=True, **options)
    assert sparse["runtime"] and not dense["runtime"]
    assert sparse["perplexity"] == pytest.approx(dense["perplexity"], rel=0.02)  # bf16 against fp32


def test_bad_evaluation_settings_are_refused_before_the_model_loads(text_file: Path) -> None:
    with pytest.raises(SparseftError, match="limit >= 1"):
        api.eval_lm_eval("no/such/model", ["gsm8k"], limit=0)  # lm-eval would run every document
    with pytest.raises(SparseftError, match="batch_size at least 1"):
        api.eval_ppl("no/such/model", str(text_file), batch_size=-1)
    assert main(["eval", "--task", "gsm8k", "no/such/model", "--batch-size", "-1"]) == 2


def test_an_output_that_cannot_be_written_is_refused_before_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the evaluation ran")

    monkeypatch.setattr(api, "eval_ppl", never)
    with pytest.raises(SparseftError, match="is a directory"):
        api.evaluate("some/model", "ppl", output=tmp_path, dataset="x.txt")


# --- generate: streaming, chat, sampling ------------------------------------------------------------------------


def test_generate_streams_the_text_piece_by_piece(exported_llama: Path) -> None:
    pieces: list[str] = []
    result = api.generate(exported_llama, "def main(", max_new_tokens=24, on_text=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == result["text"]
    assert result["new_tokens"] == 24
    assert api.generate(exported_llama, "def main(", max_new_tokens=24)["text"] == result["text"]  # greedy


@pytest.mark.parametrize("decoder", ["sparseft", "transformers"])
def test_a_seed_makes_sampling_reproducible(exported_llama: Path, decoder: str) -> None:
    def sampled(**options: Any) -> str:
        return str(api.generate(exported_llama, "def main(", 16, decoder=decoder, **options)["text"])

    greedy = sampled()
    first = sampled(temperature=1.5, seed=1)
    assert sampled(temperature=1.5, seed=1) == first != greedy
    assert sampled(temperature=1.5, seed=2) != first
    assert sampled(sample=True, seed=1) != greedy
    # top_k=1 and a tiny top_p keep only the likeliest token: sampling that is greedy decoding
    assert sampled(top_k=1, seed=3) == sampled(top_p=1e-6, seed=3) == greedy
    before = torch.random.get_rng_state()
    sampled(temperature=1.5, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)  # the seed does not touch the caller's generator


def test_generate_with_chat_uses_the_template(chat_llama: Path, exported_llama: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(chat_llama)
    as_chat = api.generate(chat_llama, "hello", max_new_tokens=8, chat=True)
    assert as_chat["prompt_tokens"] == len(tokenizer("<|user|>hello\n<|assistant|>").input_ids)
    plain = api.generate(exported_llama, "<|user|>hello\n<|assistant|>", max_new_tokens=8)
    assert as_chat["text"] == plain["text"]
    messages = [{"role": "user", "content": "hello"}]
    assert api.generate(chat_llama, messages, max_new_tokens=8)["text"] == as_chat["text"]
    with pytest.raises(SparseftError, match="has no chat template"):
        api.generate(exported_llama, "hello", chat=True)


def test_chat_keeps_the_conversation_and_loads_once(
    chat_llama: Path, exported_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[object] = []
    load_sparse = api.load_sparse

    def counted(*args: Any, **kwargs: Any) -> torch.nn.Module:
        loads.append(args[0])
        return load_sparse(*args, **kwargs)

    monkeypatch.setattr(api, "load_sparse", counted)
    first, second = api.chat(chat_llama, ["hello", "again"], max_new_tokens=8)
    assert loads == [chat_llama]
    # the same model without a template, given the conversation as the template writes it
    opening = "<|user|>hello\n<|assistant|>"
    conversation = f"{opening}{first['text']}\n<|user|>again\n<|assistant|>"
    assert first["text"] == api.generate(exported_llama, opening, max_new_tokens=8)["text"]
    assert second["text"] == api.generate(exported_llama, conversation, max_new_tokens=8)["text"]


def test_threads_apply_to_the_call_only(exported_llama: Path) -> None:
    before = torch.get_num_threads()
    during: list[int] = []
    api.generate(exported_llama, "x", 4, threads=1, on_text=lambda _: during.append(torch.get_num_threads()))
    assert during and set(during) == {1}
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": 0.0}, "temperature must be above 0"),
        ({"temperature": float("nan")}, "temperature must be above 0"),
        ({"top_p": 2.0}, "top_p must be above 0 and at most 1"),
        ({"top_p": 0.0}, "top_p must be above 0 and at most 1"),
        ({"top_k": 0}, "top_k must be 1 or more"),
        ({"seed": -1}, "seed must be from 0"),
        ({"threads": 0}, "threads must be 1 or more"),
        ({"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
    ],
)
def test_bad_generation_settings_are_refused_before_the_model_loads(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(SparseftError, match=message):
        api.generate("no/such/model", "x", **options)


def test_prune_in_memory_equals_the_path_version(
    make_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    source = make_model_dir("llama")
    settings: dict[str, Any] = {
        "method": "wanda",
        "sparsity": 0.6,
        "dataset": str(text_file),
        "num_samples": 4,
        "seqlen": 32,
        "seed": 1,
        "progress": False,
    }
    saved = sparseft.prune(str(source), tmp_path / "out", **settings)
    model = transformers.AutoModelForCausalLM.from_pretrained(source)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    files = sorted(source.iterdir())
    result = sparseft.prune(model, tokenizer=tokenizer, **settings)
    assert result.model is model and result.tokenizer is tokenizer  # pruned in place
    assert sorted(source.iterdir()) == files and list(tmp_path.iterdir()) == [
        tmp_path / "out"
    ]  # none written
    pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert model.state_dict().keys() == pruned.keys()
    assert all(torch.equal(tensor, pruned[name]) for name, tensor in model.state_dict().items())
    assert result.report["layers"] == saved.report["layers"]
    assert result.report["calibration"] == saved.report["calibration"]
    assert result["model"] == str(source)  # the directory it was loaded from; the result reads as the report


def test_prune_from_a_path_without_output_writes_nothing(
    make_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    result = sparseft.prune(str(make_model_dir("llama")), method="magnitude", sparsity=0.5, progress=False)
    assert isinstance(result, api.PruneResult) and isinstance(result.model, transformers.PreTrainedModel)
    assert result.model.model.layers[0].mlp.up_proj.weight.eq(0).float().mean().item() == pytest.approx(0.5)
    assert result.tokenizer is not None and dict(result) == result.report


def test_pruning_a_loaded_model_asks_for_what_it_needs(
    make_model_dir: Callable[..., Path], text_file: Path
) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(make_model_dir("llama"))
    with pytest.raises(SparseftError, match="with wanda needs its tokenizer: pass tokenizer="):
        sparseft.prune(model, method="wanda", dataset=str(text_file), progress=False)
    with pytest.raises(SparseftError, match="to an output needs its tokenizer"):
        sparseft.prune(model, "unused", method="magnitude", progress=False)
    with pytest.raises(SparseftError, match="takes a transformers model .* not a Sequential"):
        sparseft.prune(torch.nn.Sequential(torch.nn.Linear(4, 4)), method="magnitude", progress=False)
    sparseft.prune(model, method="magnitude", progress=False)  # magnitude in memory needs none


def test_a_sentencepiece_only_tokenizer_prunes(tmp_path: Path) -> None:
    """A Llama-2-style directory whose tokenizer is only `tokenizer.model`, with no tokenizer.json."""
    import io

    import sentencepiece

    from sparseft.demo.tiny import tiny_config

    sentences = [f"the quick brown fox {i} jumps over the lazy dog number {i * 7}" for i in range(300)]
    model_file = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model_file, vocab_size=64, minloglevel=2
    )
    source = tmp_path / "llama2"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_config("llama", vocab_size=64)).save_pretrained(source)
    (source / "tokenizer.model").write_bytes(model_file.getvalue())
    (tmp_path / "calib.txt").write_text("\n".join(sentences))
    report = sparseft.prune(
        str(source),
        tmp_path / "out",
        method="wanda",
        dataset=str(tmp_path / "calib.txt"),
        num_samples=2,
        seqlen=32,
        progress=False,
    )
    assert report["targets_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out")("the lazy dog")["input_ids"]


def test_export_takes_a_config_or_the_same_keywords(
    make_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    source = str(make_model_dir("llama"))
    by_keywords = sparseft.export(source, tmp_path / "k", "bitmask", "int4", 32, progress=False)
    config = sparseft.ExportConfig(quantize="int4", group_size=32)
    by_config = sparseft.export(source, tmp_path / "c", config=config, progress=False)
    assert (
        by_config["quantization"] == by_keywords["quantization"]
        and by_config["layers"] == by_keywords["layers"]
    )
    assert (
        sparseft.export(source, tmp_path / "o", config=config, format="hf", progress=False)["format"] == "hf"
    )
    with pytest.raises(SparseftError, match="invalid export settings: quantise: Extra inputs"):
        sparseft.export(source, tmp_path / "x", quantise="int8")
    assert not (tmp_path / "x").exists()
