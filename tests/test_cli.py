import io
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from sparseft.cli import main


def test_prune_then_eval_from_the_command_line(
    make_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pruned"
    code = main(
        [
            "prune",
            str(make_model_dir("opt")),
            "--method",
            "wanda",
            "--sparsity",
            "0.6",
            "--dataset",
            str(text_file),
            "--num-samples",
            "2",
            "--seqlen",
            "32",
            "--ignore",
            "fc2",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    assert "pruned 10 layers with wanda" in capsys.readouterr().out
    report = json.loads((out / "sparsity.json").read_text())
    assert not any(name.endswith("fc2") for name in report["layers"])
    assert (
        main(
            [
                "eval",
                "ppl",
                str(out),
                "--dataset",
                str(text_file),
                "--split",
                "train",
                "--seqlen",
                "32",
                "--output",
                str(tmp_path / "ppl.json"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "ppl.json").read_text())["perplexity"] > 1


def test_errors_are_one_line_without_traceback(
    make_model_dir: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(make_model_dir("llama"))
    capsys.readouterr()  # saving the fixture model may print progress bars
    code = main(
        [
            "prune",
            model,
            "--method",
            "magnitude",
            "--sparsity",
            "1.5",
            "--output",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("sparseft: error:") and err.count("\n") == 1 and "Traceback" not in err


def test_unknown_method_is_rejected_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["prune", "m", "--method", "random", "--output", "o"])
    assert exc.value.code == 2
    assert "invalid choice: 'random'" in capsys.readouterr().err


def test_our_warnings_print_as_one_line(
    make_model_dir: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = make_model_dir("llama", hidden=64)
    capsys.readouterr()
    argv = ["export", str(source), "-o", str(tmp_path / "out"), "--format", "hf", "--quantize", "int8"]
    assert main([*argv, "--ignore", "k_proj"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "warning" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("sparseft: warning: vLLM fuses q_proj/k_proj/v_proj"), (
        lines
    )


def test_a_refused_write_is_one_line(
    make_model_dir: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import errno
    import os

    source = make_model_dir("llama", hidden=64)
    capsys.readouterr()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    assert main(["export", str(source), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "sparseft: error: No space left on device"  # no traceback
    assert "Traceback" not in err and not (tmp_path / "out").exists()


# --- generate -------------------------------------------------------------------------------------------------


def _generate(model: Path, *args: str) -> list[str]:
    return ["generate", str(model), "--max-new-tokens", "12", *args]


class _Stdout(io.StringIO):
    """A stdout that keeps what it held at each flush."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[str] = []

    def flush(self) -> None:
        self.flushed.append(self.getvalue())


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_generate_streams_the_text_to_stdout(
    exported_llama: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sparseft import api

    expected = api.generate(exported_llama, "def main(", max_new_tokens=12)["text"]
    capsys.readouterr()
    stdout = _Stdout()
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(_generate(exported_llama, "--prompt", "def main(")) == 0
    assert stdout.getvalue() == expected + "\n"
    steps = [text for text in dict.fromkeys(stdout.flushed) if text]
    # flushed piece by piece as the text grows, not all at the end
    assert len(steps) > 1 and all(expected.startswith(text) for text in steps)
    assert capsys.readouterr().err.strip().startswith("[decoder: sparseft llama; 12 tokens in")


def test_generate_reads_the_prompt_from_stdin(
    exported_llama: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(_generate(exported_llama, "--prompt", "def main(")) == 0
    expected = capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", io.StringIO("def main(\n"))  # not a terminal
    assert main(_generate(exported_llama)) == 0
    assert capsys.readouterr().out == expected


def test_generate_chat_applies_the_template(
    chat_llama: Path,
    exported_llama: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert main(_generate(exported_llama, "--prompt", "<|user|>hello\n<|assistant|>")) == 0
    expected = capsys.readouterr().out
    assert main(_generate(chat_llama, "--chat", "--prompt", "hello")) == 0
    assert capsys.readouterr().out == expected
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert main(_generate(chat_llama, "--chat")) == 0  # stdin as one user message
    assert capsys.readouterr().out == expected
    assert main(_generate(exported_llama, "--chat", "--prompt", "hello")) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparseft: error: the tokenizer of") and "no chat template" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("leave", [EOFError(), "quit", KeyboardInterrupt()], ids=["eof", "quit", "ctrl-c"])
def test_generate_chat_at_a_terminal_takes_turns(
    leave: object,
    chat_llama: Path,
    exported_llama: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sparseft import api

    # the replies of the same model without a template, given the conversation as the template writes it
    opening = "<|user|>hello\n<|assistant|>"
    first = api.generate(exported_llama, opening, max_new_tokens=12)["text"]
    conversation = f"{opening}{first}\n<|user|>and then?\n<|assistant|>"
    second = api.generate(exported_llama, conversation, max_new_tokens=12)["text"]
    typed = iter(["hello", "", "and then?", leave])
    prompts: list[str] = []

    def fake_input(prompt: str = "") -> str:
        prompts.append(prompt)
        line = next(typed)
        if isinstance(line, BaseException):
            raise line
        return str(line)

    loads: list[object] = []
    load_sparse = api.load_sparse

    def counted(*args: Any, **kwargs: Any) -> torch.nn.Module:
        loads.append(args[0])
        return load_sparse(*args, **kwargs)

    monkeypatch.setattr(api, "load_sparse", counted)
    monkeypatch.setattr(sys, "stdin", _Terminal())
    monkeypatch.setattr("builtins.input", fake_input)
    capsys.readouterr()
    assert main(_generate(chat_llama)) == 2  # a terminal and no prompt: --chat is needed to chat
    assert "--chat" in capsys.readouterr().err and not prompts
    assert main(_generate(chat_llama, "--chat")) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"{first}\n{second}".strip()
    assert prompts == ["> "] * 4 and len(loads) == 1
    assert captured.err.count("12 tokens in") == 2


def test_generate_seed_makes_sampling_reproducible(
    exported_llama: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def sampled(*args: str) -> str:
        assert main(_generate(exported_llama, "--prompt", "def main(", *args)) == 0
        return capsys.readouterr().out

    first = sampled("--temperature", "1.5", "--seed", "1")
    assert sampled("--temperature", "1.5", "--seed", "1") == first
    assert sampled("--temperature", "1.5", "--seed", "2") != first
    assert sampled("--seed", "1") == sampled()  # greedy: the seed does nothing (and a warning says so)
    assert sampled("--top-k", "1", "--seed", "5", "--threads", "1") == sampled()  # top-k 1 samples greedily


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--temperature", "0"], "temperature must be above 0, got 0.0"),
        (["--top-p", "2"], "top_p must be above 0 and at most 1, got 2.0"),
        (["--top-k", "0"], "top_k must be 1 or more, got 0"),
        (["--threads", "0"], "threads must be 1 or more, got 0"),
    ],
)
def test_generate_bad_values_are_one_line_errors(
    flags: list[str], message: str, exported_llama: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_generate(exported_llama, "--prompt", "x", *flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sparseft: error: {message}") and len(err.strip().splitlines()) == 1
