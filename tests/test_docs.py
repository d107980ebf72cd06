"""The documentation's commands run as written: every code block of README.md and docs/*.md marked runnable is
executed here on a tiny model, offline.

How to mark a block: put the HTML comment `<!-- runnable -->` alone on the line right before its ```bash or
```python fence (GitHub does not render the comment). Leave a block unmarked when it needs the network, a big model,
a GPU or a running server; `<!-- not runnable: why -->` may say so to the reader. Each marked block runs:

- in a fresh empty directory holding `calib.txt` (plain text) and `train.jsonl` (GSM8K-style question/answer
  records), so a block may name those files;
- with its line `MODEL=...` (bash) or `MODEL = ...` (python) replaced by the path of a tiny Llama (hidden 64, two
  blocks, built from a config as tests/conftest.py does), so a block shows a real model id to users and runs on
  the tiny one here;
- bash with `set -euo pipefail` and this venv's `sparseft` first on PATH, python with this interpreter;
- with HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1: no block may reach the network;
- on one thread (OMP_NUM_THREADS=1): a tiny model gains nothing from more, and on a busy machine torch's threads
  waiting for each other made the blocks many times slower.

Keep marked blocks cheap (the tiny model makes prune and export take seconds; fine-tuning runs a few steps over the
16 records of train.jsonl): this file should stay under about a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- runnable -->"
LANGUAGES = ("bash", "python")
MODEL_LINE = re.compile(r"^MODEL\s*=.*$", re.MULTILINE)
TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    source: str  # "README.md:42", the line of the opening fence
    language: str
    code: str


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def runnable_blocks(path: Path) -> list[Block]:
    """The fenced blocks of `path` whose fence follows a line holding only the marker."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{i + 2}"
        fence = lines[i + 1].strip() if i + 1 < len(lines) else ""
        language = fence.removeprefix("```")
        if not fence.startswith("```") or language not in LANGUAGES:
            raise ValueError(
                f"{where}: {MARKER} must sit right before a ```bash or ```python fence, found {fence!r}"
            )
        end = next((j for j in range(i + 2, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"{where}: the block is never closed")
        blocks.append(Block(where, language, "\n".join(lines[i + 2 : end]) + "\n"))
    return blocks


BLOCKS = [block for path in doc_files() for block in runnable_blocks(path)]


def with_model(block: Block, model: Path) -> str:
    line = f"MODEL={model}" if block.language == "bash" else f"MODEL = {str(model)!r}"
    return MODEL_LINE.sub(lambda _: line, block.code)


def test_the_readme_has_runnable_quickstarts() -> None:
    readme = [b for b in BLOCKS if b.source.startswith("README.md")]
    assert sorted(b.language for b in readme) == ["bash", "python"], [b.source for b in readme]


def test_the_marker_is_found_where_it_stands(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        f"{MARKER}\n```python\nprint(1)\n```\n\n```bash\nnot marked\n```\n{MARKER}\n```text\nx\n```\n"
    )
    with pytest.raises(ValueError, match="right before a ```bash or ```python fence"):
        runnable_blocks(page)
    page.write_text(f"{MARKER}\n```python\nMODEL = 'org/name'\nprint(MODEL)\n```\n```bash\nnot marked\n```\n")
    (block,) = runnable_blocks(page)
    assert block.language == "python"
    assert with_model(block, Path("/m")) == "MODEL = '/m'\nprint(MODEL)\n"


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qa") / "train.jsonl"
    rows = []
    for a in range(16):
        question = f"Tom has {a} apples and buys {a + 3} more. How many apples does he have?"
        answer = f"{a} + {a + 3} = <<{a}+{a + 3}={2 * a + 3}>>{2 * a + 3}\n#### {2 * a + 3}"
        rows.append({"question": question, "answer": answer})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("block", BLOCKS, ids=[b.source for b in BLOCKS])
def test_runnable_block(
    block: Block, make_model_dir: Callable[..., Path], text_file: Path, qa_file: Path, tmp_path: Path
) -> None:
    model = make_model_dir("llama")
    shutil.copy(text_file, tmp_path / "calib.txt")
    shutil.copy(qa_file, tmp_path / "train.jsonl")
    code = with_model(block, model)
    if block.language == "bash":
        command = ["bash", "-c", "set -euo pipefail\n" + code]
    else:
        (tmp_path / "block.py").write_text(code)
        command = [sys.executable, "block.py"]
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    assert done.returncode == 0, (
        f"{block.source} failed (exit {done.returncode}):\n{code}\n--- stdout\n{done.stdout[-3000:]}"
        f"\n--- stderr\n{done.stderr[-3000:]}"
    )
