import json
from pathlib import Path

import pytest

from sparseft import formats
from sparseft.cli import main
from sparseft.data import mathtask
from sparseft.demo import pipeline
from sparseft.errors import SparseftError


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--output", str(output)]) == 0
    return output


def test_quick_demo_runs_the_whole_pipeline(quick_run: Path) -> None:
    result = json.loads((quick_run / "demo.json").read_text())
    assert set(result["accuracy"]) == {"dense", "pruned", "recovered", "runtime"}
    assert all(0.0 <= a <= 1.0 for a in result["accuracy"].values())
    assert all(speed > 0 for speed in result["decode_tok_s"].values())
    assert set(result["seconds"]) == {"teacher", "prune", "finetune", "export", "evaluate", "benchmark"}
    # One-shot SparseGPT to 70%, and fine-tuning kept every pruned weight at zero.
    pruned = json.loads((quick_run / "pruned" / "sparsity.json").read_text())
    assert pruned["method"] == "sparsegpt" and pruned["targets_sparsity"] == pytest.approx(0.7, abs=0.01)
    student = json.loads((quick_run / "student" / "metrics.json").read_text())
    assert student["stages"][-1]["sparsity"] >= pruned["targets_sparsity"] - 1e-6
    assert {"ce", "squarehead"} <= set(student["history"][-1])
    # The shipped artefact is the int8 bitmask archive, smaller on disk than the dense teacher.
    assert formats.detect(quick_run / "export") == "bitmask"
    export = json.loads((quick_run / "export" / "export.json").read_text())
    assert export["quantization"]["bits"] == 8
    assert result["size_on_disk"]["export"] < result["size_on_disk"]["dense"]


def test_quick_demo_writes_the_report_with_its_table_and_plots(quick_run: Path) -> None:
    report = (quick_run / "report.md").read_text()
    assert "| model | accuracy | decode tokens/s | size on disk |" in report
    assert "| SparseGPT 70% one-shot |" in report
    for plot in ("loss.png", "accuracy.png", "speed.png"):
        assert (quick_run / plot).read_bytes()[:4] == b"\x89PNG"
        assert f"]({plot})" in report


def test_the_teacher_is_cached_while_its_inputs_stay_the_same(quick_run: Path) -> None:
    weights = quick_run / "teacher" / "model" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    data = pipeline.bundled_data(quick_run, pipeline.QUICK)
    start = pipeline.initial_model(quick_run, pipeline.QUICK)
    assert pipeline.teacher(quick_run, start, data, pipeline.QUICK, progress=False) == str(weights.parent)
    assert weights.stat().st_mtime_ns == stamp  # reused, not retrained


def test_the_teacher_is_trained_again_when_its_data_changes_in_place(
    quick_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = pipeline.bundled_data(quick_run, pipeline.QUICK)
    start = pipeline.initial_model(quick_run, pipeline.QUICK)
    calls = []
    monkeypatch.setattr(pipeline, "finetune", lambda *args, **kwargs: calls.append(args))
    train, key = Path(data.train[0]), quick_run / "teacher" / "demo_key.json"
    original, original_key = train.read_text(), key.read_text()
    try:
        train.write_text(original + original.splitlines(keepends=True)[0])  # one record more, same path
        pipeline.teacher(quick_run, start, data, pipeline.QUICK, progress=False)
    finally:
        train.write_text(original)
        key.write_text(original_key)
    assert len(calls) == 1  # not served from the cache


def test_dataset_without_model_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--quick", "--output", str(tmp_path), "--dataset", "gsm8k"]) == 2
    assert "--dataset needs --model" in capsys.readouterr().err


def test_a_local_dataset_is_a_directory_with_both_splits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "one.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    argv = ["demo", "--output", str(tmp_path / "out"), "--model", str(tmp_path), "--dataset"]
    assert main([*argv, str(tmp_path / "one.jsonl")]) == 2
    assert "directory holding train.jsonl and test.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything is written
    mathtask.write_dataset(tmp_path / "task", 4, 2, seed=0)
    data = pipeline.task_data(str(tmp_path / "task"))
    assert data.train == (str(tmp_path / "task" / "train.jsonl"), "train") and data.test[0].endswith(
        "test.jsonl"
    )


def test_quick_demo_exports_and_runs_int4(tmp_path: Path) -> None:
    assert main(["demo", "--quick", "--quantize", "int4", "--output", str(tmp_path), "-q"]) == 0
    result = json.loads((tmp_path / "demo.json").read_text())
    export = json.loads((tmp_path / "export" / "export.json").read_text())
    assert export["quantization"]["bits"] == 4 and export["quantization"]["group_size"] == 128
    assert result["quantize"] == "int4" and "sparse int4" in result["decode_tok_s"]
    assert 0.0 <= result["accuracy"]["runtime"] <= 1.0
    assert "| exported bitmask int4, runtime |" in (tmp_path / "report.md").read_text()


def test_demo_refuses_other_values() -> None:
    with pytest.raises(SparseftError, match="int8 or int4"):
        pipeline.run_demo(quantize="int2")
