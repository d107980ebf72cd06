"""The bundled offline task: grade-school math word problems with worked answers in GSM8K's own layout.

Each answer is a few sentences, one per calculation, with the calculation annotated as GSM8K does
(`She sold 48/2 = <<48/2=24>>24 clips in May.`) and a last line `#### 72`. Every template builds its numbers so
that every intermediate result is a whole number, and takes 2-4 operations. Records use GSM8K's field names,
`question` and `answer`, so everything that reads GSM8K reads these.

`max_value` sets the difficulty: every number of a problem (question, each step, final answer) stays at or below
it. The default (None) keeps the full ranges, whose intermediate results reach about 1,400; `max_value=99` keeps
two-digit arithmetic, which a model of a few million parameters learns within minutes on a CPU.

Splits are decided by a hash of the question text, not by position: a test question can never appear in any
train set, whatever the seeds or sizes the two were generated with.

The tokenizer the demo's models use on this task ships with the demo (`sparseft.demo.tiny.load_task_tokenizer`).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sparseft.errors import SparseftError
from sparseft.io import atomic_dir

NAME = "mathtask"  # how commands name this task as a dataset (`sparseft eval MODEL --task gsm8k --dataset mathtask`)
MIN_MAX_VALUE = 30  # every template can meet 20, but below ~30 redrawing until a few templates fit gets slow
TEST_SHARE = 0.2  # fraction of the question space that belongs to the test split
SPLITS = ("train", "test")

NAMES = ["Natalia", "James", "Maria", "Tom", "Aisha", "Ken", "Lucia", "Omar", "Priya", "Sam", "Greta"]
NAMES += ["Diego", "Mei", "Noah", "Fatima", "Ivan", "Chloe", "Kofi", "Hana", "Leo"]
ITEMS = ["apples", "pencils", "stickers", "cookies", "marbles", "books", "eggs", "cards", "shells", "stamps"]
ITEMS += ["cupcakes", "flowers", "toy cars", "candles", "buttons"]
CONTAINERS = ["boxes", "bags", "packs", "crates", "baskets", "jars"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October"]
JOBS = ["babysitting", "walking dogs", "tutoring", "washing cars", "mowing lawns", "painting fences"]


class Steps:
    """Collects the worked solution: each `calc` does one operation, writes the annotated sentence, returns c."""

    SYMBOLS: dict[str, Callable[[int, int], int]] = {
        "+": lambda a, b: a + b,
        "-": lambda a, b: a - b,
        "*": lambda a, b: a * b,
        "/": lambda a, b: a // b,
    }

    def __init__(self) -> None:
        self.lines: list[str] = []

    def calc(self, a: int, op: str, b: int, sentence: str) -> int:
        """`sentence` holds `{}` where the annotated calculation goes, e.g. "She sold {} clips in May."."""
        if op == "/" and a % b:
            raise ValueError(f"{a}/{b} is not whole")  # a template bug: numbers are built to divide evenly
        c = self.SYMBOLS[op](a, b)
        self.lines.append(sentence.format(f"{a}{op}{b} = <<{a}{op}{b}={c}>>{c}"))
        return c

    def answer(self, result: int) -> str:
        return "\n".join([*self.lines, f"#### {result}"])


def _sold_in_months(rng: random.Random, s: Steps) -> tuple[str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    m1, m2 = (MONTHS[i] for i in sorted(rng.sample(range(len(MONTHS)), 2)))
    k = rng.choice([2, 3, 4, 5])
    first = k * rng.randint(3, 30)
    second = s.calc(first, "/", k, f"{name} sold {{}} {item} in {m2}.")
    total = s.calc(first, "+", second, f"{name} sold {{}} {item} altogether in {m1} and {m2}.")
    fraction = {2: "half", 3: "a third", 4: "a quarter", 5: "a fifth"}[k]
    question = (
        f"{name} sold {item} to {first} friends in {m1}, one each, and then sold {fraction} as many "
        f"{item} in {m2}. How many {item} did {name} sell altogether in {m1} and {m2}?"
    )
    if rng.random() < 0.5:  # a second phrasing of the same problem
        question = (
            f"In {m1}, {name} sold {first} {item}. In {m2}, {name} sold {fraction} as many. "
            f"How many {item} did {name} sell in the two months?"
        )
    return question, total


def _packs_shared(rng: random.Random, s: Steps) -> tuple[str, int]:
    name, friend = rng.sample(NAMES, 2)
    item, box = rng.choice(ITEMS), rng.choice(CONTAINERS)
    packs, per_pack, people = rng.randint(2, 12), rng.randint(3, 15), rng.randint(2, 6)
    bought = packs * per_pack
    # Choose how many are given away so that the rest divides evenly among `people`.
    kept = people * rng.randint(1, max(1, (bought - 1) // people))
    given = bought - kept
    total = s.calc(packs, "*", per_pack, f"{name} bought {{}} {item}.")
    left = s.calc(total, "-", given, f"After giving some to {friend}, {name} had {{}} {item} left.")
    each = s.calc(left, "/", people, f"Each person got {{}} {item}.")
    question = (
        f"{name} buys {packs} {box} of {item} with {per_pack} {item} in each. {name} gives {given} {item} "
        f"to {friend} and shares the rest equally among {people} people. How many {item} does each "
        f"person get?"
    )
    return question, each


def _hourly_pay(rng: random.Random, s: Steps) -> tuple[str, int]:
    name, job = rng.choice(NAMES), rng.choice(JOBS)
    rate, hours, days = rng.randint(5, 25), rng.randint(2, 8), rng.randint(2, 7)
    spent = rng.randint(1, rate * hours * days - 1)
    per_day = s.calc(rate, "*", hours, f"{name} earns ${{}} per day.")
    earned = s.calc(per_day, "*", days, f"In {days} days {name} earns ${{}}.")
    left = s.calc(earned, "-", spent, f"After shopping {name} has ${{}} left.")
    question = (
        f"{name} earns ${rate} an hour for {job}. {name} works {hours} hours a day for {days} days and "
        f"then spends ${spent} on a present. How much money does {name} have left?"
    )
    return question, left


def _collections(rng: random.Random, s: Steps) -> tuple[str, int]:
    a, b, c = rng.sample(NAMES, 3)
    item = rng.choice(ITEMS)
    first, times = rng.randint(3, 40), rng.randint(2, 5)
    second_count = first * times
    fewer = rng.randint(1, second_count - 1)
    second = s.calc(first, "*", times, f"{b} has {{}} {item}.")
    third = s.calc(second, "-", fewer, f"{c} has {{}} {item}.")
    pair = s.calc(first, "+", second, f"{a} and {b} have {{}} {item} together.")
    total = s.calc(pair, "+", third, f"All three have {{}} {item}.")
    question = (
        f"{a} has {first} {item}. {b} has {times} times as many {item} as {a}, and {c} has {fewer} fewer "
        f"{item} than {b}. How many {item} do the three of them have in total?"
    )
    return question, total


def _ages(rng: random.Random, s: Steps) -> tuple[str, int]:
    child, parent = rng.sample(NAMES, 2)
    age, times, years = rng.randint(3, 15), rng.randint(2, 4), rng.randint(2, 20)
    parent_now = s.calc(age, "*", times, f"{parent} is {{}} years old now.")
    parent_then = s.calc(parent_now, "+", years, f"In {years} years {parent} will be {{}} years old.")
    child_then = s.calc(age, "+", years, f"In {years} years {child} will be {{}} years old.")
    total = s.calc(parent_then, "+", child_then, "Their ages will add up to {} years.")
    question = (
        f"{child} is {age} years old and {parent} is {times} times as old as {child}. What will the sum "
        f"of their ages be in {years} years?"
    )
    return question, total


def _baking(rng: random.Random, s: Steps) -> tuple[str, int]:
    name, box = rng.choice(NAMES), rng.choice(CONTAINERS)
    trays, per_tray, size = rng.randint(2, 9), rng.randint(4, 24), rng.randint(2, 8)
    baked = trays * per_tray
    boxes_full = rng.randint(1, max(1, (baked - 1) // size))
    eaten = baked - boxes_full * size
    total = s.calc(trays, "*", per_tray, f"{name} baked {{}} cookies.")
    left = s.calc(total, "-", eaten, f"{name} had {{}} cookies left to pack.")
    boxes = s.calc(left, "/", size, f"{name} filled {{}} {box}.")
    question = (
        f"{name} bakes {trays} trays of cookies with {per_tray} cookies on each tray. The family eats "
        f"{eaten} of them, and {name} packs the rest into {box} of {size}. How many {box} does {name} "
        f"fill?"
    )
    return question, boxes


TEMPLATES = [_sold_in_months, _packs_shared, _hourly_pay, _collections, _ages, _baking]


def split_of(question: str) -> str:
    """The split a question belongs to, fixed by its text so that splits can never overlap."""
    bucket = int(hashlib.sha256(question.encode()).hexdigest()[:8], 16) / 0x1_0000_0000
    return "test" if bucket < TEST_SHARE else "train"


_INTEGER = re.compile(r"\d+")


def largest_number(problem: dict[str, str]) -> int:
    """The largest whole number written anywhere in the problem's question or worked answer."""
    return max(int(n) for n in _INTEGER.findall(problem["question"] + "\n" + problem["answer"]))


def make_problem(rng: random.Random, max_value: int | None = None) -> dict[str, str]:
    """One problem of a uniformly chosen template; with `max_value`, that template's numbers are drawn again
    until they fit, so the bound does not tilt the mix of templates towards those with small numbers."""
    template = rng.choice(TEMPLATES)
    while True:
        steps = Steps()
        question, result = template(rng, steps)
        problem = {"question": question, "answer": steps.answer(result)}
        # Without a bound the first draw is taken: the default keeps the random stream of earlier versions.
        if max_value is None or largest_number(problem) <= max_value:
            return problem


def generate(
    n: int, split: str = "train", seed: int = 0, max_value: int | None = None
) -> list[dict[str, str]]:
    """`n` distinct problems of `split`, the same for the same (n, split, seed, max_value); a smaller n gives a
    prefix. `max_value` bounds every number of a problem (see the module docstring); None: the full ranges."""
    if split not in SPLITS:
        raise SparseftError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if n < 0:
        raise SparseftError(f"the number of problems must be at least 0, got {n}")
    if max_value is not None and max_value < MIN_MAX_VALUE:
        raise SparseftError(
            f"max_value must be at least {MIN_MAX_VALUE}, got {max_value} (below it most draws of some templates "
            "are rejected and generation crawls); use None for the full ranges"
        )
    rng = random.Random(f"sparseft-mathtask-{seed}")
    records: list[dict[str, str]] = []
    seen: set[str] = set()
    attempts = 0
    while len(records) < n:
        attempts += 1
        if attempts > 50 * n + 1000:  # the question space is far larger; this only guards against a bug
            raise SparseftError(f"could not generate {n} distinct {split} problems")
        problem = make_problem(rng, max_value)
        if problem["question"] in seen or split_of(problem["question"]) != split:
            continue
        seen.add(problem["question"])
        records.append(problem)
    return records


def write_jsonl(records: list[dict[str, Any]], path: str | Path) -> None:
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def write_dataset(
    output: str | Path, n_train: int, n_test: int, seed: int = 0, max_value: int | None = None
) -> dict[str, Path]:
    """Write `train.jsonl` and `test.jsonl` into `output` (atomically) and return their paths."""
    with atomic_dir(output) as tmp:
        write_jsonl(generate(n_train, "train", seed, max_value), tmp / "train.jsonl")
        write_jsonl(generate(n_test, "test", seed, max_value), tmp / "test.jsonl")
    return {split: Path(output) / f"{split}.jsonl" for split in SPLITS}
