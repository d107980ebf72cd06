import importlib.metadata
import io
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from sparseft.cli import build_parser, main
from sparseft.errors import SparseftError


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
                "--json",
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
        (["--threads", "0"], "--threads must be 1 or more, got 0"),
    ],
)
def test_generate_bad_values_are_one_line_errors(
    flags: list[str], message: str, exported_llama: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_generate(exported_llama, "--prompt", "x", *flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sparseft: error: {message}") and len(err.strip().splitlines()) == 1


# --- one vocabulary: renamed flags, defaults in the help, common flags -------------------------------------------


class _Calls:
    """Stands in for an API function: records how the CLI called it, then stops the verb or returns `result`."""

    def __init__(self, result: Any = None) -> None:
        self.result = result
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.threads: list[int] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        self.threads.append(torch.get_num_threads())
        if self.result is None:
            raise SparseftError("stopped by the test")
        return self.result


_BENCH_REPORT = {
    "decoder": "sparseft llama",
    "kind": "causal",
    "results": {"_machine": {"threads": 1, "kernels": "ref", "copy_gb_s": 1.0, "clock_ghz": None}},
}

# verb and arguments, old spelling, new spelling, value, the API function, the value the API got
RENAMES = {
    "export --method": (
        ["export", "m", "-o", "out"], "--method", "--quant-method", "gptq", "export",
        lambda args, kwargs: args[5],
    ),
    "finetune --format": (
        ["finetune", "-o", "out"], "--format", "--data-format", "chat", "finetune",
        lambda args, kwargs: kwargs["data__format"],
    ),
    "eval --output": (
        ["eval", "--task", "gsm8k", "m", "--dtype", "float32"], "--output", "--json", "{tmp}/r.json", "evaluate",
        lambda args, kwargs: kwargs["output"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", RENAMES.values(), ids=RENAMES.keys())
def test_a_renamed_flag_works_in_both_spellings_and_the_old_one_warns(
    case: tuple[Any, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sparseft import api

    argv, old, new, value, function, got = case
    value = value.format(tmp=tmp_path)
    fake = _Calls()
    monkeypatch.setattr(api, function, fake)
    assert main([*argv, old, value]) == 2  # the fake stops the verb once called
    err = capsys.readouterr().err.splitlines()
    assert (
        err[0] == f"sparseft: warning: {old} is now {new}; the old spelling stops working in the next release"
    )
    assert err[1:] == ["sparseft: error: stopped by the test"]
    assert main([*argv, new, value]) == 2
    assert "warning" not in capsys.readouterr().err
    assert [got(*call) for call in fake.calls] == [value, value]


@pytest.mark.parametrize("spelling", ["--output", "--json"])
def test_bench_writes_its_json_with_either_spelling(
    spelling: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sparseft import api

    monkeypatch.setattr(api, "bench", _Calls(_BENCH_REPORT))
    assert main(["bench", "m", spelling, str(tmp_path / "bench.json")]) == 0
    assert json.loads((tmp_path / "bench.json").read_text())["decoder"] == "sparseft llama"
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warned == (["sparseft: warning: --output is now --json; the old spelling stops working in the next "
                       "release"] if spelling == "--output" else [])  # fmt: skip


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"sparseft {importlib.metadata.version('sparseft')}\n"


def _verbs() -> list[str]:
    return sorted(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]


def _help(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("COLUMNS", "200")  # one line per flag, as far as argparse allows
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def _flag_helps(text: str) -> dict[str, tuple[list[str], str]]:
    """Each flag of a --help text: (its metavars, its help)."""
    entries: dict[str, tuple[list[str], str]] = {}
    flags: list[str] = []
    for line in text.splitlines():
        if line.startswith("  -"):
            invocation, _, help_text = line.strip().partition("  ")
            words = [word.rstrip(",") for word in invocation.split()]
            flags = [word for word in words if word.startswith("-")]
            metavars = [word for word in words if not word.startswith("-")]
            entries.update({flag: (metavars, help_text.strip()) for flag in flags})
        elif line.startswith("    ") and flags:
            entries.update({flag: (entries[flag][0], f"{entries[flag][1]} {line.strip()}") for flag in flags})
        else:
            flags = []
    return entries


def test_sparseft_help_is_for_users(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = _help([], capsys, monkeypatch)
    assert "No logic of its own" not in text and "calls sparseft.api" not in text
    assert "Prune, sparse fine-tune, export and run" in text
    assert all(re.search(rf"^    {verb} ", text, re.MULTILINE) for verb in _verbs())


def test_every_help_shows_defaults_and_readable_metavars(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    parser = build_parser()
    verbs = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert len(verbs) == 9
    for verb, sub in verbs.items():
        text = _help([verb], capsys, monkeypatch)
        assert "(default: None)" not in text and "(default: False)" not in text, verb
        helps = _flag_helps(text)
        for action in sub._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            metavars, help_text = helps[action.option_strings[0]]
            assert help_text, f"{verb} {action.option_strings[0]} has no help"
            # a choice list or a word in capitals, not a recipe key (LOSS.CE, TRAIN.LR)
            readable = [m for m in metavars if m.startswith("{") or ("." not in m and m.isupper())]
            assert readable == metavars, verb
            if action.default not in (None, False, argparse.SUPPRESS):
                assert f"(default: {action.default})" in help_text, (verb, action.option_strings, help_text)


def _default_shown(helps: dict[str, tuple[list[str], str]], flag: str) -> str:
    found = re.search(r"\(default: ([^)]*)\)", helps[flag][1])
    assert found, f"{flag} shows no default: {helps[flag][1]}"
    return found.group(1).split(",")[0]


def _same(shown: str, value: object) -> bool:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(shown) == float(value)
    return shown == str(value)


def test_the_defaults_shown_are_the_configs_defaults(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """prune and finetune flags default to None (a recipe may set them), so their help writes the default out:
    it must be the one PruneConfig and FinetuneConfig apply."""
    from sparseft.finetuning.config import FinetuneConfig
    from sparseft.pruning.config import PruneConfig

    prune = _flag_helps(_help(["prune"], capsys, monkeypatch))
    config = PruneConfig()
    for flag in ("--method", "--split", "--text-field", "--num-samples", "--seqlen", "--seed"):
        assert _same(_default_shown(prune, flag), getattr(config, flag[2:].replace("-", "_"))), flag
    assert _default_shown(prune, "--sparsity") == "0.5"

    finetune = _flag_helps(_help(["finetune"], capsys, monkeypatch))
    ft = FinetuneConfig(data={"dataset": "data.jsonl"}, teacher="teacher")  # the settings without a default
    expected = {
        "--loss": ft.loss.name,
        "--temperature": ft.loss.temperature,
        "--split": ft.data.split,
        "--data-format": ft.data.format,
        "--question-field": ft.data.question_field,
        "--answer-field": ft.data.answer_field,
        "--prompt-field": ft.data.prompt_field,
        "--response-field": ft.data.response_field,
        "--text-field": ft.data.text_field,
        "--seqlen": ft.data.seqlen,
        "--lr": ft.train.lr,
        "--epochs": ft.train.epochs,
        "--micro-batch-size": ft.train.micro_batch_size,
        "--grad-accum": ft.train.grad_accum,
        "--warmup-steps": ft.train.warmup_steps,
        "--weight-decay": ft.train.weight_decay,
        "--max-grad-norm": ft.train.max_grad_norm,
        "--seed": ft.train.seed,
        "--save-every": ft.train.save_every,
        "--keep-last": ft.train.keep_last,
        "--dtype": ft.dtype,
    }
    for flag, value in expected.items():
        assert _same(_default_shown(finetune, flag), value), flag
    assert not ft.data.packing and "(default: one example per row)" in finetune["--packing"][1]


def _bf16_checkpoint(make_model_dir: Callable[..., Path], where: Path) -> Path:
    import transformers

    config = transformers.AutoConfig.from_pretrained(make_model_dir("llama"))
    config.dtype = torch.bfloat16
    config.save_pretrained(where)
    return where


def test_dtype_auto_is_the_checkpoints_dtype(
    make_model_dir: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sparseft import api

    model = str(_bf16_checkpoint(make_model_dir, tmp_path / "bf16"))
    for verb, argv in {
        "prune": ["prune", model, "-o", str(tmp_path / "out")],
        "evaluate": ["eval", model, "--task", "gsm8k"],
        "export": ["export", model, "-o", str(tmp_path / "out")],
    }.items():
        fake = _Calls()
        monkeypatch.setattr(api, verb, fake)
        assert main(argv) == 2 and main([*argv, "--dtype", "float16"]) == 2
        auto, chosen = (kwargs["dtype"] for _, kwargs in fake.calls)
        # export reads None as "the checkpoint's own", and loads archives in their stored dtype too
        assert (auto, chosen) == ((None if verb == "export" else "bfloat16"), "float16"), verb
        assert fake.calls[0][1]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    capsys.readouterr()


def test_threads_hold_while_the_verb_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sparseft import api

    before = torch.get_num_threads()
    for verb, argv in {
        "prune": ["prune", "m", "-o", str(tmp_path / "out"), "--dtype", "float32"],
        "evaluate": ["eval", "m", "--task", "gsm8k", "--dtype", "float32"],
        "bench": ["bench", "m"],
    }.items():
        fake = _Calls()
        monkeypatch.setattr(api, verb, fake)
        assert main([*argv, "--threads", "1"]) == 2
        assert fake.threads == [1] and torch.get_num_threads() == before, verb
        assert main([*argv, "--threads", "0"]) == 2 and not fake.calls[1:]
        assert (
            capsys.readouterr().err.strip().splitlines()[-1]
            == "sparseft: error: --threads must be 1 or more, got 0"
        )


def test_quiet_turns_the_progress_bars_off(
    make_model_dir: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers.utils import logging

    model = str(make_model_dir("llama"))
    capsys.readouterr()
    argv = ["prune", model, "--method", "magnitude", "--dtype", "float32", "--overwrite"]
    assert main([*argv, "-o", str(tmp_path / "loud")]) == 0
    assert "magnitude: 100%" in capsys.readouterr().err  # tqdm's bar over the layers
    assert main([*argv, "-o", str(tmp_path / "quiet"), "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.startswith("pruned ")
    assert logging.is_progress_bar_enabled()  # -q lasts as long as the verb


def test_eval_decoder_reaches_the_runtime(
    exported_llama: Path, text_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sparseft import api

    decoders: list[str] = []
    load_sparse = api.load_sparse

    def recorded(*args: Any, **kwargs: Any) -> torch.nn.Module:
        decoders.append(kwargs["decoder"])
        return load_sparse(*args, **kwargs)

    monkeypatch.setattr(api, "load_sparse", recorded)
    argv = [
        "eval",
        "ppl",
        str(exported_llama),
        "--dataset",
        str(text_file),
        "--split",
        "train",
        "--seqlen",
        "32",
    ]
    assert main([*argv, "--runtime", "--decoder", "transformers", "-q"]) == 0
    assert main([*argv, "--runtime", "-q"]) == 0
    assert decoders == ["transformers", "auto"]
    assert main([*argv, "--decoder", "sparseft"]) == 2
    assert "add --runtime" in capsys.readouterr().err


def test_importing_the_cli_imports_no_verb(tmp_path: Path) -> None:
    code = "import sys, sparseft.cli; print(sorted({'torch', 'transformers', 'datasets'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
