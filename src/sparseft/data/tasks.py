"""Task data for fine-tuning: records -> token rows with labels, one example per row or packed (batched by
`sparseft.data.batch.collate`).

Three layouts (see `DataConfig`): question-answer with the loss on the answer only (GSM8K: `question`, `answer`
whose final result follows `####`), chat-style prompt/response with the loss on the response only, and plain
text for causal LM. Prompt tokens and padding carry the label IGNORE_INDEX.

Padding puts one example per row, right-padded to the longest row of the batch, with attention_mask 0 on pads.
Packing fills each row with whole examples and restarts `position_ids` at every example: Hugging Face models
that build their masks with `masking_utils` (Llama, Qwen2, Mistral, GPT-2, ... in transformers >= 4.56) then
attend only within each example when no attention_mask and no cache are passed (`sparseft.data.batch.model_inputs`, and
`use_cache=False` as training runs). A model that does not build its mask from `position_ids` (MPT's forward does
not take them, OPT's ignores them) cannot keep them apart: `check_packing` finds that out and refuses packing.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import ConfigDict, field_validator, model_validator
from torch import nn

from sparseft.data import IGNORE_INDEX
from sparseft.data.records import load_records
from sparseft.data.seq2seq import PairFields
from sparseft.errors import SparseftError, SparseftWarning


class DataConfig(PairFields):
    """Task data for fine-tuning (and for calibrating the prune stages).

    format "qa": `prompt_template` filled from the record, loss on `answer_field` only (GSM8K: question/answer);
    "chat": `prompt_field` through the tokenizer's chat template, loss on `response_field` only;
    "text": causal LM on `text_field`, loss on every token;
    "translation" / "speech": encoder-decoder examples (T5, Whisper) from the `PairFields`, loss on the target.
    """

    model_config = ConfigDict(extra="forbid")

    dataset: str
    dataset_config: str | None = None
    split: str = "train"
    format: Literal["qa", "chat", "text", "translation", "speech"] = "qa"
    question_field: str = "question"
    answer_field: str = "answer"
    prompt_template: str = "Question: {question}\nAnswer: "
    prompt_field: str = "prompt"
    response_field: str = "response"
    text_field: str = "text"
    seqlen: int = 512
    packing: bool = False
    max_examples: int | None = None

    @field_validator("seqlen")
    @classmethod
    def _seqlen_positive(cls, value: int) -> int:
        if value < 2:
            raise ValueError(f"must be at least 2, got {value}")
        return value

    @field_validator("max_examples")
    @classmethod
    def _max_examples_positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"must be at least 1 (or unset for every record), got {value}")
        return value

    @model_validator(mode="after")
    def _template_fills_from_question(self) -> DataConfig:
        if self.format != "qa":
            return self
        # Fill it as `prompt_and_response` will, with `question` alone, so that a stray field or brace
        # fails here and not as a KeyError after the data is loaded.
        marker = "\x00question\x00"
        try:
            filled = self.prompt_template.format(question=marker)
        except KeyError as e:
            raise ValueError(
                f"prompt_template {self.prompt_template!r} names {{{e.args[0]}}}, but only {{question}} is filled "
                "in; remove it (write a literal brace as {{ or }})"
            ) from None
        except (IndexError, ValueError, AttributeError) as e:
            raise ValueError(
                f"prompt_template {self.prompt_template!r} cannot be filled ({e}); use {{question}} for the "
                "question and write a literal brace as {{ or }}"
            ) from None
        if marker not in filled:
            raise ValueError(f"prompt_template {self.prompt_template!r} must contain {{question}}")
        return self


@dataclass(frozen=True)
class Row:
    """One training row: token ids, their labels, and (packed rows only) positions restarting per example."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None


def required_fields(cfg: DataConfig) -> list[str]:
    if cfg.format == "qa":
        return [cfg.question_field, cfg.answer_field]
    if cfg.format == "chat":
        return [cfg.prompt_field, cfg.response_field]
    return [cfg.text_field]


def prompt_and_response(record: dict[str, Any], cfg: DataConfig, tokenizer: Any) -> tuple[str, str]:
    """The text that carries no loss and the text that does."""
    if cfg.format == "qa":
        prompt = cfg.prompt_template.format(question=record[cfg.question_field])
        # The space ending "Answer: " is the model's to write: evaluation prompts "Answer:" and expects " 42", and
        # where a space is a token of its own it would otherwise never be learnt.
        cut = len(prompt.rstrip(" "))
        return prompt[:cut], prompt[cut:] + str(record[cfg.answer_field])
    if cfg.format == "chat":
        prompt, response = str(record[cfg.prompt_field]), str(record[cfg.response_field])
        if not getattr(tokenizer, "chat_template", None):
            return prompt + "\n", response
        messages = [{"role": "user", "content": prompt}]
        opening = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The whole exchange as the template writes it, so the response ends with the template's own end of turn
        # (Llama 3's <|eot_id|>, Qwen's <|im_end|>, Gemma's <end_of_turn>): the token generation stops at.
        turn = [*messages, {"role": "assistant", "content": response}]
        whole = tokenizer.apply_chat_template(turn, tokenize=False)
        if whole.startswith(opening) and response in whole[len(opening) :]:
            return opening, whole[len(opening) :]
        return opening, response  # a template that rewrites earlier turns: the response as given
    return "", str(record[cfg.text_field])


def encode(tokenizer: Any, prompt: str, response: str) -> Row:
    """Tokenize prompt + response + EOS together; label only the tokens that end inside the response.

    Tokenizing the joined text (not the two parts) gives the tokens the model sees at inference, and the
    character offsets tell which of them belong to the response, even when one token straddles the boundary.
    """
    text = prompt + response
    # A chat template may already write the BOS token: the tokenizer must not add a second one.
    bos = getattr(tokenizer, "bos_token", None)
    special = not (isinstance(bos, str) and bos and text.startswith(bos))
    if tokenizer.is_fast:
        enc = tokenizer(text, return_offsets_mapping=True, verbose=False, add_special_tokens=special)
        ids = list(enc["input_ids"])
        in_response = [end > len(prompt) for _, end in enc["offset_mapping"]]
    else:
        head = tokenizer(prompt, verbose=False, add_special_tokens=special)["input_ids"] if prompt else []
        tail = tokenizer(response, add_special_tokens=False, verbose=False)["input_ids"]
        ids, in_response = list(head) + list(tail), [False] * len(head) + [True] * len(tail)
    if ids and ids[-1] == tokenizer.eos_token_id:
        in_response[-1] = True  # the tokenizer (add_eos_token) or the text wrote it already: learn it, once
    elif tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        in_response.append(True)
    labels = [i if keep else IGNORE_INDEX for i, keep in zip(ids, in_response, strict=True)]
    return Row(ids, labels)


def _split_long(row: Row, seqlen: int, keep_tail: bool) -> list[Row]:
    if len(row.input_ids) <= seqlen:
        return [row]
    if not keep_tail:  # a QA or chat example cut to its first seqlen tokens
        return [Row(row.input_ids[:seqlen], row.labels[:seqlen])]
    # Plain text loses nothing: a long document becomes several rows.
    return [
        Row(row.input_ids[i : i + seqlen], row.labels[i : i + seqlen])
        for i in range(0, len(row.input_ids), seqlen)
    ]


def pack(rows: list[Row], seqlen: int) -> list[Row]:
    """Greedily fill rows of at most `seqlen` tokens with whole examples, positions restarting at each."""
    packed: list[Row] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for row in rows:
        if ids and len(ids) + len(row.input_ids) > seqlen:
            packed.append(Row(ids, labels, positions))
            ids, labels, positions = [], [], []
        ids += row.input_ids
        # No loss on an example's first token: the position before it is the previous example's last token,
        # which cannot see this example. (In the row's first example that label is never used anyway.)
        labels += [IGNORE_INDEX] + row.labels[1:]
        positions += list(range(len(row.input_ids)))
    if ids:
        packed.append(Row(ids, labels, positions))
    return packed


def check_packing(model: nn.Module, cfg: DataConfig) -> None:
    """Refuse packing for a model that would let packed examples attend to each other.

    Packed rows keep examples apart only through `position_ids`, which a model must both take (MPT's forward
    swallows them in **kwargs) and build its attention mask from (OPT's does not). So one short row of two
    examples is run once: the second must come out as it does alone, else the training signal is silently wrong.
    """
    if not cfg.packing:
        return
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    refused = SparseftError(
        f"packing keeps examples apart through position_ids, which {model_type} models ({type(model).__name__}) "
        "do not honour, so packed examples would attend to each other; drop --packing"
    )
    if "position_ids" not in inspect.signature(model.forward).parameters:
        raise refused
    vocab = int(getattr(model.config, "vocab_size", 8))
    first, second = torch.arange(1, 7) % vocab, torch.arange(11, 17) % vocab
    positions = torch.arange(6)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():  # no cache, as in training: with one, the packed rows' mask is not derived
            ids, both = torch.cat([first, second])[None], torch.cat([positions, positions])[None]
            packed = model(input_ids=ids.to(device), position_ids=both.to(device), use_cache=False).logits[
                0, 6:
            ]
            alone = model(
                input_ids=second[None].to(device), position_ids=positions[None].to(device), use_cache=False
            )
    finally:
        model.train(was_training)
    expected = alone.logits[0].float()
    if not torch.allclose(packed.float(), expected, rtol=1e-2, atol=1e-2 * float(expected.abs().max())):
        raise refused


def check_values(records: Any, cfg: DataConfig) -> None:
    """Fail on a null, list or mapping field, which `str` would otherwise turn into text ("None", "[{'role': ...")
    and train on."""
    for field in required_fields(cfg):
        for i, value in enumerate(records[field]):
            if value is None:
                raise SparseftError(
                    f"row {i + 1} of {cfg.dataset} has no value (null) in field {field!r}; fill it in or drop the row"
                )
            if isinstance(value, list | dict):
                raise SparseftError(
                    f"row {i + 1} of {cfg.dataset} holds a {type(value).__name__} in field {field!r}, not text; "
                    f"format {cfg.format!r} takes one string per field (write a list of messages out as text)"
                )


def build_rows(tokenizer: Any, cfg: DataConfig) -> list[Row]:
    """Load, check and tokenize the task data. Fails before any training on missing fields or empty labels."""
    records = load_records(cfg.dataset, cfg.dataset_config, cfg.split)
    missing = [f for f in required_fields(cfg) if f not in records.column_names]
    if missing:
        raise SparseftError(
            f"dataset {cfg.dataset} has no field {', '.join(repr(m) for m in missing)} needed by format "
            f"{cfg.format!r}; its fields are {', '.join(records.column_names)} (set the *_field options or format)"
        )
    if cfg.max_examples is not None:
        records = records.select(range(min(cfg.max_examples, len(records))))
    check_values(records, cfg)
    rows: list[Row] = []
    cut = 0
    for record in records:
        prompt, response = prompt_and_response(record, cfg, tokenizer)
        row = encode(tokenizer, prompt, response)
        cut += cfg.format != "text" and len(row.input_ids) > cfg.seqlen
        rows += _split_long(row, cfg.seqlen, keep_tail=cfg.format == "text")
    learnable = [r for r in rows if any(label != IGNORE_INDEX for label in r.labels[1:])]
    if not learnable:
        raise SparseftError(
            f"no example of {cfg.dataset} has a token to learn: every label is masked (empty "
            f"{required_fields(cfg)[-1]!r} fields, or prompts longer than seqlen={cfg.seqlen}; raise --seqlen)"
        )
    problems = []
    if cut:
        problems.append(
            f"{cut} of {len(records)} examples are longer than seqlen={cfg.seqlen} tokens and are cut to it, losing "
            f"the end of their {required_fields(cfg)[-1]!r} and its EOS (raise --seqlen)"
        )
    if len(learnable) < len(rows):
        problems.append(f"{len(rows) - len(learnable)} rows have no token to learn and are left out")
    if problems:
        warnings.warn(f"{cfg.dataset}: {'; '.join(problems)}", SparseftWarning, stacklevel=2)
    rows = learnable
    return pack(rows, cfg.seqlen) if cfg.packing else rows
