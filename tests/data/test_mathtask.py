from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

import pytest

from sparseft.data import mathtask
from sparseft.data.records import load_records
from sparseft.errors import SparseftError

CALC = re.compile(r"(\d+)([+\-*/])(\d+) = <<(\d+)([+\-*/])(\d+)=(-?\d+)>>(-?\d+)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


@pytest.fixture(scope="module")
def problems() -> dict[str, list[dict[str, str]]]:
    return {"train": mathtask.generate(1500, "train", seed=0), "test": mathtask.generate(500, "test", seed=0)}


def test_generation_is_deterministic_for_a_seed() -> None:
    first = mathtask.generate(40, "train", seed=7)
    assert first == mathtask.generate(40, "train", seed=7)
    assert first[:10] == mathtask.generate(10, "train", seed=7)  # a smaller set is a prefix
    assert first != mathtask.generate(40, "train", seed=8)


def check_arithmetic(records: list[dict[str, str]]) -> None:
    for record in records:
        *steps, final = record["answer"].split("\n")
        assert 2 <= len(steps) <= 4, record["answer"]
        results = []
        for line in steps:
            (calc,) = CALC.findall(line)  # exactly one annotated calculation per line
            a, op, b, a2, op2, b2, c, shown = calc
            assert (a, op, b) == (a2, op2, b2)  # the text repeats the annotation's calculation
            value = OPS[op](Fraction(a), Fraction(b))
            assert value == int(c) == int(shown) and value >= 0, line
            results.append(int(c))
        assert final == f"#### {results[-1]}"


def test_every_calculation_and_final_answer_is_correct(problems: dict[str, list[dict[str, str]]]) -> None:
    check_arithmetic(problems["train"] + problems["test"])


@pytest.mark.parametrize("max_value", [30, 99, 500])
def test_max_value_bounds_every_number_and_keeps_the_arithmetic(max_value: int) -> None:
    records = mathtask.generate(300, "train", seed=3, max_value=max_value)
    records += mathtask.generate(100, "test", seed=3, max_value=max_value)
    check_arithmetic(records)
    numbers = [int(n) for r in records for n in re.findall(r"\d+", r["question"] + r["answer"])]
    assert max(numbers) <= max_value
    assert all(mathtask.largest_number(r) <= max_value for r in records)
    # The bound redraws numbers within a template, it does not drop templates: all six still appear.
    openings = {r["answer"].split("\n")[0].split("=")[0].split()[1] for r in records}
    assert len(openings) == 6, openings


def test_max_value_is_deterministic_and_changes_the_problems() -> None:
    easy = mathtask.generate(50, "train", seed=4, max_value=99)
    assert easy == mathtask.generate(50, "train", seed=4, max_value=99)
    assert easy[:10] == mathtask.generate(10, "train", seed=4, max_value=99)
    assert easy != mathtask.generate(50, "train", seed=5, max_value=99)
    full = mathtask.generate(200, "train", seed=4)
    assert max(mathtask.largest_number(r) for r in full) > 99  # the default keeps the full ranges
    assert mathtask.generate(200, "train", seed=4, max_value=None) == full


def test_default_problems_are_unchanged_by_the_difficulty_setting() -> None:
    # Pinned from the generator before `max_value` existed: cached teachers and datasets stay valid.
    first = mathtask.generate(1, "train", seed=0)[0]
    assert first["answer"].endswith("#### 2")
    assert first["question"].startswith("Omar earns $11 an hour for mowing lawns.")


def test_a_bound_below_the_minimum_is_a_clear_error() -> None:
    with pytest.raises(SparseftError, match="max_value must be at least 30"):
        mathtask.generate(5, max_value=10)


def test_all_templates_and_operations_are_used(problems: dict[str, list[dict[str, str]]]) -> None:
    answers = "\n".join(r["answer"] for r in problems["train"])
    assert {op for *_, op, _b, _c, _s in CALC.findall(answers)} == {"+", "-", "*", "/"}
    openings = {r["question"].split()[1] for r in problems["train"]}
    assert len(openings) >= 6  # varied phrasing, not one template
    assert all("?" in r["question"] for r in problems["train"])


def test_splits_do_not_overlap_whatever_the_seeds(problems: dict[str, list[dict[str, str]]]) -> None:
    train = {r["question"] for r in problems["train"] + mathtask.generate(500, "train", seed=1)}
    test = {r["question"] for r in problems["test"] + mathtask.generate(300, "test", seed=1)}
    assert not train & test
    assert len(problems["train"]) == len(
        {r["question"] for r in problems["train"]}
    )  # distinct within a split
    assert all(mathtask.split_of(q) == "test" for q in test)


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(SparseftError, match="unknown split 'validation'"):
        mathtask.generate(5, "validation")
    with pytest.raises(SparseftError, match="at least 0"):
        mathtask.generate(-1)


def test_write_dataset_gives_gsm8k_style_jsonl(tmp_path: Path) -> None:
    paths = mathtask.write_dataset(tmp_path / "math", n_train=30, n_test=10, seed=2)
    lines = paths["test"].read_text().splitlines()
    assert [json.loads(line) for line in lines] == mathtask.generate(10, "test", seed=2)
    records = load_records(str(paths["train"]))
    assert records.column_names == ["question", "answer"] and len(records) == 30
    easy = mathtask.write_dataset(tmp_path / "easy", n_train=20, n_test=5, seed=2, max_value=50)
    lines = easy["train"].read_text().splitlines()
    assert [json.loads(line) for line in lines] == mathtask.generate(20, "train", seed=2, max_value=50)
