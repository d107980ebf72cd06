import json
from pathlib import Path

from sparseft.cli import main


def test_quick_demo_runs_end_to_end_and_caches_the_dense_model(tmp_path: Path) -> None:
    assert main(["demo", "--quick", "--output", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "demo.json").read_text())
    methods = {(r["method"], r["setting"]) for r in result["rows"]}
    assert ("dense", "-") in methods and ("sparsegpt", "70%") in methods and ("wanda", "2:4") in methods
    assert all(r["perplexity"] > 1 for r in result["rows"])
    assert "| sparsegpt | 70% |" in (tmp_path / "report.md").read_text()
    weights = tmp_path / "dense" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert main(["demo", "--quick", "--output", str(tmp_path)]) == 0
    assert weights.stat().st_mtime_ns == stamp  # the trained model was reused, not retrained
