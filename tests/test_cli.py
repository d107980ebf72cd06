import json
from collections.abc import Callable
from pathlib import Path

import pytest

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
