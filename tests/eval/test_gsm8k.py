from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sparseft import api
from sparseft.cli import main
from sparseft.data import mathtask
from sparseft.errors import SparseftError
from sparseft.eval.gsm8k import (
    choose_shots,
    extract_answer,
    greedy_generate,
    gsm8k_accuracy,
    gsm8k_prompt,
    parse_number,
)

MathModel = tuple[Any, Any, list[dict[str, str]], Path]

# Answers as GSM8K's own data writes them (train split), and model outputs without the final marker.
GSM8K_ANSWERS = [
    (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in "
        "April and May.\n#### 72",
        "72",
    ),
    (
        "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
        "$<<0.2*50=10>>10.\n#### 10",
        "10",
    ),
    ("The total cost is 2 * $1,000 = $<<2*1000=2000>>2,000.\n#### 2,000", "2000"),
    ("The temperature fell by 5 - 8 = <<5-8=-3>>-3 degrees.\n#### -3", "-3"),
    ("Each share is 7/2 = <<7/2=3.5>>3.5 pounds.\n#### 3.5", "3.5"),
    ("So the answer is $1,234.50.", "1234.5"),  # `####` missing: the last number
    ("He had 10 apples, gave away 4, so 6 are left", "6"),
    ("#### 18\n\nQuestion: Tom has 5 apples", "18"),  # the first number after ####, not a later one
    ("#### $1,000.00", "1000"),
    ("I do not know.", None),
]


@pytest.mark.parametrize(("text", "expected"), GSM8K_ANSWERS)
def test_extract_answer_reads_gsm8k_formats(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_numbers_compare_by_value() -> None:
    assert parse_number("1,000") == parse_number("1000.00") == parse_number("1000") == "1000"
    assert parse_number("-0") == parse_number("0.0") == "0"
    assert parse_number("0.50") == "0.5" and parse_number("100") == "100"
    assert parse_number("abc") is None
    # Exact at any length, so a runaway generation still compares right.
    assert parse_number("9" * 40) == "9" * 40


def test_generated_answers_parse_to_their_own_result() -> None:
    for record in mathtask.generate(200, "test", seed=3):
        assert extract_answer(record["answer"]) == record["answer"].rsplit("#### ", 1)[1]


def test_prompts_follow_lm_eval_gsm8k_layout() -> None:
    assert gsm8k_prompt("How many?") == "Question: How many?\nAnswer:"
    shots = [("Q1?", "A1\n#### 1"), ("Q2?", "A2\n#### 2")]
    assert (
        gsm8k_prompt("Q3?", shots)
        == "Question: Q1?\nAnswer: A1\n#### 1\n\nQuestion: Q2?\nAnswer: A2\n#### 2\n\nQuestion: Q3?\nAnswer:"
    )


def test_fewshot_examples_are_seeded_and_never_the_question_itself() -> None:
    pool = mathtask.generate(6, "train", seed=0)
    questions = [r["question"] for r in pool]
    chosen = choose_shots(pool, questions, 3, seed=1)
    assert chosen == choose_shots(pool, questions, 3, seed=1)
    assert chosen != choose_shots(pool, questions, 3, seed=2)
    for question, shots in zip(questions, chosen, strict=True):
        assert len(shots) == 3 and question not in [q for q, _ in shots]
    assert choose_shots(pool, questions, 0, seed=1) == [[]] * 6
    with pytest.raises(SparseftError, match="6-shot needs more than 6"):
        choose_shots(pool, questions, 6, seed=1)


def test_memorised_answers_score_exactly_as_constructed(math_model: MathModel) -> None:
    model, tok, records, _ = math_model
    result = gsm8k_accuracy(model, tok, records, batch_size=4, max_new_tokens=120, progress=False)
    assert result["accuracy"] == 1.0 and result["correct"] == result["total"] == 8
    assert [s["generation"].strip() for s in result["samples"]] == [r["answer"] for r in records]
    # The same generations against golds changed for every other record: exactly half are right.
    wrong = [
        {"question": r["question"], "answer": f"#### {int(extract_answer(r['answer']) or 0) + 1}"}
        if i % 2
        else r
        for i, r in enumerate(records)
    ]
    result = gsm8k_accuracy(model, tok, wrong, batch_size=8, max_new_tokens=120, progress=False)
    assert result["accuracy"] == 0.5
    assert [s["correct"] for s in result["samples"]] == [i % 2 == 0 for i in range(8)]
    assert result["protocol"]["num_fewshot"] == 0 and result["protocol"]["generation"] == "greedy"


def test_batched_generation_matches_one_by_one(math_model: MathModel) -> None:
    model, tok, records, _ = math_model
    # Prompts of different lengths (one shot for some) so that batches carry left padding.
    prompts = [
        gsm8k_prompt(r["question"], [(records[0]["question"], records[0]["answer"])] * (i % 2))
        for i, r in enumerate(records)
    ]
    side = tok.padding_side
    batched = greedy_generate(model, tok, prompts, batch_size=8, max_new_tokens=40)
    single = greedy_generate(model, tok, prompts, batch_size=1, max_new_tokens=40)
    assert batched == single
    assert tok.padding_side == side  # left padding was only for generation
    assert len({len(tok(p)["input_ids"]) for p in prompts}) > 1


def test_generation_stops_at_stop_strings(math_model: MathModel) -> None:
    model, tok, records, _ = math_model
    prompts = [gsm8k_prompt(r["question"]) for r in records[:3]]
    cut = greedy_generate(model, tok, prompts, batch_size=3, max_new_tokens=120, stop_strings=["####"])
    full = greedy_generate(model, tok, prompts, batch_size=3, max_new_tokens=120)
    for short, long in zip(cut, full, strict=True):
        assert "####" not in short and "####" in long and long.startswith(short)


def test_generation_stops_at_every_end_token_the_model_lists(
    math_model: MathModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tok, records, _ = math_model
    prompt = gsm8k_prompt(records[0]["question"])
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    first = int(model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id)[0, -1])
    # a second end token, as Llama 3 lists <|eot_id|> beside its eos: here, the first token the model writes
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tok.eos_token_id, first])
    (text,) = greedy_generate(model, tok, [prompt], max_new_tokens=40)
    assert text == tok.decode([first], skip_special_tokens=True)


def test_bad_records_are_clear_errors(math_model: MathModel) -> None:
    model, tok, records, _ = math_model
    with pytest.raises(SparseftError, match="no number in its answer"):
        gsm8k_accuracy(model, tok, [{"question": "q?", "answer": "unknown"}], progress=False)
    with pytest.raises(SparseftError, match="no records"):
        gsm8k_accuracy(model, tok, [], progress=False)


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_eval_gsm8k_writes_json_with_protocol(math_model: MathModel, tmp_path: Path) -> None:
    _, _, records, model_dir = math_model
    data = _write_jsonl(tmp_path / "test.jsonl", records)
    out = tmp_path / "res" / "gsm8k.json"
    argv = ["eval", str(model_dir), "--task", "gsm8k", "--dataset", str(data), "--max-new-tokens", "120"]
    assert main([*argv, "--json", str(out), "--limit", "4"]) == 0
    result = json.loads(out.read_text())
    assert result["accuracy"] == 1.0 and result["total"] == 4 and len(result["samples"]) == 4
    assert result["model"] == str(model_dir) and result["task"] == "gsm8k" and result["seed"] == 0
    assert result["protocol"]["max_new_tokens"] == 120 and result["dataset"]["dataset"] == str(data)


def test_api_evaluate_on_the_bundled_task_and_a_loaded_model(math_model: MathModel) -> None:
    model, tok, records, _ = math_model
    result = api.evaluate(
        model, "gsm8k", tokenizer=tok, limit=3, max_new_tokens=8, num_fewshot=1, progress=False
    )
    assert result["dataset"]["dataset"] == "mathtask" and result["total"] == 3
    bundled = mathtask.generate(3, "test", seed=0)
    assert [s["question"] for s in result["samples"]] == [r["question"] for r in bundled]
    assert (
        result["protocol"]["num_fewshot"] == 1 and result["protocol"]["fewshot_source"] == "fewshot records"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "bogus"], "unknown task 'bogus'"),
        ([], "name exactly one task"),
        (["--task", "ppl"], "ppl needs --dataset"),
    ],
)
def test_cli_rejects_bad_tasks(
    math_model: MathModel, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", str(math_model[3]), *argv]) == 2
    assert message in capsys.readouterr().err


def test_model_directory_without_tokenizer_is_a_clear_error(
    make_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((make_model_dir() / name).read_bytes())
    with pytest.raises(SparseftError, match="has no tokenizer: save one"):
        api.evaluate(str(bare), "gsm8k", limit=2, progress=False)


def test_dataset_missing_its_answer_field_fails_before_the_model_loads(tmp_path: Path) -> None:
    data = _write_jsonl(tmp_path / "qa.jsonl", [{"question": "How many?", "solution": "#### 3"}])
    with pytest.raises(SparseftError, match="no field 'answer'.*--answer-field"):
        api.evaluate(str(tmp_path / "no-such-model"), "gsm8k", dataset=str(data))


def test_gsm8k_on_the_sparse_cpu_runtime(math_model: MathModel, tmp_path: Path) -> None:
    _, _, records, model_dir = math_model
    exported = tmp_path / "bitmask"
    api.export(str(model_dir), exported, format="bitmask", progress=False)
    result = api.evaluate(str(exported), "gsm8k", runtime=True, limit=8, max_new_tokens=120, progress=False)
    assert result["runtime"] is True and result["dataset"]["dataset"] == "mathtask"
    memorised = [r["question"] for r in records]
    assert [s["question"] for s in result["samples"]] == memorised
    assert result["accuracy"] == 1.0


def test_fewshot_examples_do_not_depend_on_the_limit(
    math_model: MathModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, _, directory = math_model
    data = _write_jsonl(tmp_path / "qa.jsonl", mathtask.generate(30, "test", seed=4))
    seen = []

    def record_shots(net: Any, tok: Any, records: Any, *args: Any) -> dict[str, Any]:
        seen.append(([r["question"] for r in records], args[4]))  # the evaluated questions, the shot pool
        return {}

    monkeypatch.setattr(api, "gsm8k_accuracy", record_shots)
    for limit in (5, 20):
        api.eval_gsm8k(str(directory), data, num_fewshot=2, limit=limit, progress=False)
    (first, pool_5), (_, pool_20) = seen
    assert pool_5 == pool_20 and len(pool_5) == 30  # the whole file, not the records --limit kept
    assert first == [r["question"] for r in pool_5[:5]]
