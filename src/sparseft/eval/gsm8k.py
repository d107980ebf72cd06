"""GSM8K-style exact-match accuracy of a causal LM: few-shot prompts in lm-evaluation-harness's layout, greedy
generation in batches, the final number compared by value."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sparseft.errors import SparseftError

# GSM8K-style accuracy. The prompt is lm-evaluation-harness's `gsm8k` task format ("Question: ...\nAnswer:",
# few-shot examples as "Question: ...\nAnswer: <worked answer>" joined by blank lines), so figures compare with
# lm-eval's; generation is greedy and stops at the next "Question:" or a blank line; the prediction is the number
# after the first "####", else the last number in the generation; numbers compare by value ("1,000" == "1000.0").
QUESTION, ANSWER, SHOT_SEPARATOR = "Question: ", "\nAnswer:", "\n\n"
STOP_STRINGS = ["Question:", "\n\n"]
# A number as GSM8K writes it: optional minus, digits with optional thousands commas, optional decimals.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def parse_number(text: str) -> str | None:
    """A number's canonical form ("1,234.50" -> "1234.5", "-0" -> "0"), or None when `text` is not a number."""
    try:
        value = Decimal(text.replace(",", "").replace("$", "").strip())
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    # Fixed-point text without trailing zeros; exact at any length (Decimal.normalize would round to 28 digits).
    fixed = format(value, "f")
    if "." in fixed:
        fixed = fixed.rstrip("0").rstrip(".")
    return "0" if value == 0 else fixed


def extract_answer(text: str) -> str | None:
    """The final answer in a GSM8K-style solution: the first number after "####", else the last number."""
    marked = text.split("####", 1)
    if len(marked) == 2:
        found = _NUMBER.search(marked[1])
        if found is not None:
            return parse_number(found.group())
    numbers = _NUMBER.findall(text)
    return parse_number(numbers[-1]) if numbers else None


def gsm8k_prompt(question: str, shots: Sequence[tuple[str, str]] = ()) -> str:
    """Zero-shot or few-shot prompt; `shots` are (question, answer) pairs shown before the question."""
    parts = [f"{QUESTION}{q}{ANSWER} {a}" for q, a in shots]
    return SHOT_SEPARATOR.join([*parts, f"{QUESTION}{question}{ANSWER}"])


def choose_shots(
    pool: Sequence[dict[str, str]], questions: Sequence[str], num_fewshot: int, seed: int
) -> list[list[tuple[str, str]]]:
    """For each question, `num_fewshot` examples drawn from `pool` with `seed`, never the question itself."""
    if num_fewshot == 0:
        return [[] for _ in questions]
    if num_fewshot >= len(pool):
        raise SparseftError(
            f"{num_fewshot}-shot needs more than {num_fewshot} examples to draw from, got {len(pool)}"
        )
    rng = random.Random(seed)
    chosen = []
    for question in questions:
        picks = [
            pool[i] for i in rng.sample(range(len(pool)), num_fewshot + 1) if pool[i]["question"] != question
        ]
        chosen.append([(r["question"], r["answer"]) for r in picks[:num_fewshot]])
    return chosen


@torch.inference_mode()
def greedy_generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    batch_size: int = 8,
    max_new_tokens: int = 256,
    stop_strings: Sequence[str] = (),
    progress: bool = False,
) -> list[str]:
    """Greedy continuations of `prompts`, cut at the first stop string.

    Prompts are left-padded so that every row's last prompt token sits at the end of the batch, where decoding
    continues; the attention mask hides the padding and HF derives position ids from it, so a batched prompt
    decodes exactly as it would alone. Prompts are sorted by length first so that batches carry little padding.
    """
    if tokenizer.pad_token_id is None:
        raise SparseftError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token)")
    device = next(model.parameters()).device
    # the model's own end tokens where it lists them (Llama 3 ends turns with <|eot_id|>), and the tokenizer's
    generation = getattr(model, "generation_config", None)
    ends = getattr(generation, "eos_token_id", None)
    ends = [ends] if isinstance(ends, int) else list(ends or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ends:
        ends.append(tokenizer.eos_token_id)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress):
            rows = order[start : start + batch_size]
            batch = tokenizer(
                [prompts[i] for i in rows], return_tensors="pt", padding=True, add_special_tokens=False
            )
            generated = model.generate(  # type: ignore[operator]
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=ends or None,
                stop_strings=list(stop_strings) or None,
                tokenizer=tokenizer if stop_strings else None,
            )
            new_tokens = generated[:, batch["input_ids"].shape[1] :]
            for i, text in zip(
                rows, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), strict=True
            ):
                outputs[i] = _cut(text, stop_strings)
    finally:
        tokenizer.padding_side = side
    return outputs


def _cut(text: str, stop_strings: Sequence[str]) -> str:
    for stop in stop_strings:
        text = text.split(stop, 1)[0]
    return text


def gsm8k_accuracy(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[dict[str, str]],
    batch_size: int = 8,
    max_new_tokens: int = 256,
    num_fewshot: int = 0,
    seed: int = 0,
    fewshot_records: Sequence[dict[str, str]] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Exact-match accuracy of greedy answers on GSM8K-style records (`question`, `answer` with `#### N`).

    Few-shot examples come from `fewshot_records` (use the train split) or else from `records`, excluding the
    question being asked. Returns the accuracy, counts, the protocol, and every sample with its prediction.
    """
    if not records:
        raise SparseftError("no records to evaluate")
    golds = [extract_answer(r["answer"]) for r in records]
    if None in golds:
        bad = golds.index(None)
        raise SparseftError(f"record {bad} has no number in its answer: {records[bad]['answer'][:80]!r}")
    questions = [r["question"] for r in records]
    shots = choose_shots(fewshot_records or records, questions, num_fewshot, seed)
    prompts = [gsm8k_prompt(q, s) for q, s in zip(questions, shots, strict=True)]
    generations = greedy_generate(
        model, tokenizer, prompts, batch_size, max_new_tokens, STOP_STRINGS, progress
    )
    predictions = [extract_answer(g) for g in generations]
    hits = [p == g for p, g in zip(predictions, golds, strict=True)]
    samples = [
        {"question": q, "gold": g, "generation": text, "prediction": p, "correct": hit}
        for q, g, text, p, hit in zip(questions, golds, generations, predictions, hits, strict=True)
    ]
    return {
        "accuracy": sum(hits) / len(hits),
        "correct": sum(hits),
        "total": len(hits),
        "protocol": {
            "prompt": "lm-eval gsm8k: 'Question: {question}\\nAnswer:', shots joined by blank lines",
            "num_fewshot": num_fewshot,
            "fewshot_source": "fewshot records"
            if fewshot_records
            else "the evaluated records, never the same one",
            "generation": "greedy",
            "max_new_tokens": max_new_tokens,
            "stop": STOP_STRINGS,
            "answer": "first number after '####', else the last number; compared by value",
            "seed": seed,
        },
        "samples": samples,
    }
