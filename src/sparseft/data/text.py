"""Text for calibration and perplexity: a source's texts, joined into one token stream or cut into random windows
of tokens (the calibration samples of a causal LM)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from sparseft.data.records import check_local, is_local, load_records
from sparseft.errors import SparseftError


@dataclass(frozen=True)
class TextSource:
    """Where text comes from: a local file or a `datasets` name, with its config, split and text column."""

    dataset: str
    config: str | None = None
    split: str = "train"
    text_field: str = "text"

    def describe(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "config": self.config,
            "split": self.split,
            "text_field": self.text_field,
        }


def _check_field(source: TextSource, fields: list[str]) -> None:
    if source.text_field not in fields:
        raise SparseftError(
            f"dataset {source.dataset} has no field {source.text_field!r}; its fields are "
            f"{', '.join(fields)} (choose one with --text-field)"
        )


def load_texts(source: TextSource) -> list[str]:
    records = load_records(source.dataset, source.config, source.split)
    _check_field(source, records.column_names)
    texts = [t for t in records[source.text_field] if isinstance(t, str)]
    if not any(t.strip() for t in texts):
        raise SparseftError(f"dataset {source.dataset} field {source.text_field!r} holds no text")
    return texts


def token_stream(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """All texts joined by blank lines and tokenized once, as in the usual perplexity protocol."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def random_windows(stream: torch.Tensor, num_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`num_samples` windows of `seqlen` tokens at random offsets (seeded), shape (num_samples, seqlen)."""
    if num_samples < 1:
        raise SparseftError(f"num_samples must be at least 1, got {num_samples}")
    if stream.numel() < seqlen:
        raise SparseftError(
            f"the calibration text has {stream.numel()} tokens, fewer than one window of seqlen={seqlen}; "
            "use more text or a smaller --seqlen"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seqlen + 1, (num_samples,), generator=gen)
    return torch.stack([stream[s : s + seqlen] for s in starts.tolist()])


def calibration_samples(
    tokenizer: Any, source: TextSource, num_samples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """`num_samples` windows of `seqlen` tokens from random places in the source's text (seeded), shape
    (num_samples, seqlen). A local .txt file is read piece by piece, never whole; other sources are read as
    records and joined by blank lines (see `sample_windows` for how little of either is tokenized)."""
    check_local(source.dataset)
    path = Path(source.dataset).expanduser()
    text: Text
    if is_local(source.dataset) and path.suffix == ".txt":
        _check_field(source, ["text"])  # a text file is one record of one field, as `load_records` reads it
        text = FileText(path)
    else:
        text = JoinedTexts(load_texts(source))
    return sample_windows(tokenizer, text, num_samples, seqlen, seed)


# --- calibration windows without tokenizing the whole text ------------------------------------------------------
# Tokenizing a whole calibration text to cut a few windows from it costs time and memory in proportion to the
# text (token ids, offsets and byte strings per token), so a large text is never tokenized whole: each window
# is tokenized from a piece of text read at a random offset. A text no longer than those pieces together is
# tokenized whole, as the pieces would cover most of it anyway.

# The first guess at how much text a window needs, in characters (bytes of a file) per token: more than most
# tokenizers take, so that one piece usually suffices; a piece that tokenizes short is read again twice as long.
CHARS_PER_TOKEN = 6
_SPACE = re.compile(r"\s")
_LAST_SPACE = re.compile(r"\s\S*\Z")


class Text(Protocol):
    """Text that can be read in pieces: `size` positions (characters of a string, bytes of a file)."""

    size: int

    def read(self, start: int, length: int) -> str: ...

    def whole(self) -> str: ...


class FileText:
    """A UTF-8 text file, read at byte offsets. A piece cut inside a character starts or ends with U+FFFD, which
    the whitespace alignment of `sample_windows` drops."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = path.stat().st_size

    def read(self, start: int, length: int) -> str:
        with self.path.open("rb") as f:
            f.seek(start)
            return f.read(length).decode("utf-8", errors="replace")

    def whole(self) -> str:
        return self.path.read_text(encoding="utf-8", errors="replace")


class JoinedTexts:
    """Texts (records) joined by blank lines, as `token_stream` joins them."""

    def __init__(self, texts: list[str]) -> None:
        self.text = "\n\n".join(texts)
        self.size = len(self.text)

    def read(self, start: int, length: int) -> str:
        return self.text[start : start + length]

    def whole(self) -> str:
        return self.text


def sample_windows(tokenizer: Any, text: Text, num_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`num_samples` windows of `seqlen` tokens at random places of `text` (seeded), shape (num_samples, seqlen).

    A text of at most `num_samples` pieces is tokenized whole and cut by `random_windows`. From a larger one, each
    window is the first `seqlen` tokens of a piece read at a random position, trimmed to whole words (from its first
    whitespace to its last) so that its tokens are those of the running text, except near the cuts."""
    if num_samples < 1:
        raise SparseftError(f"num_samples must be at least 1, got {num_samples}")
    length = seqlen * CHARS_PER_TOKEN
    if text.size <= num_samples * length:
        return random_windows(token_stream(tokenizer, [text.whole()]), num_samples, seqlen, seed)
    generator = torch.Generator().manual_seed(seed)
    places = torch.rand(num_samples, generator=generator, dtype=torch.float64).tolist()
    windows = []
    for place in places:
        while True:
            start = int(place * (text.size - length))
            ids = _piece_ids(tokenizer, text.read(start, length), start > 0)
            if len(ids) >= seqlen:
                break
            length *= 2  # and for the windows after this one: the text takes more characters per token
            if length >= text.size:  # too little text per token for windows of this size: the whole text
                return random_windows(token_stream(tokenizer, [text.whole()]), num_samples, seqlen, seed)
        windows.append(ids[:seqlen])
    return torch.tensor(windows, dtype=torch.long)


def _piece_ids(tokenizer: Any, piece: str, cut_start: bool) -> list[int]:
    """Token ids of the whole words of a piece cut from a longer text (at its start where `cut_start`): a word cut
    in two tokenizes otherwise than in the running text."""
    first = _SPACE.search(piece) if cut_start else None
    last = _LAST_SPACE.search(piece)
    begin = first.start() if first is not None else 0
    end = last.start() if last is not None and last.start() > begin else len(piece)
    ids: list[int] = tokenizer(piece[begin:end], add_special_tokens=False, verbose=False)["input_ids"]
    return ids
