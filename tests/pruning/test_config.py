import pytest

from sparseft.errors import SparseftError
from sparseft.pruning.config import prune_config


def test_empty_prune_section_reads_as_no_settings(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("prune:\n")
    assert prune_config(recipe, method="wanda").method == "wanda"
    for text in ("prune:\nsparsity: 0.7\n", "sparsity: 0.7\nprune:\n  targets: [q_proj]\n"):
        recipe.write_text(text)  # settings meant for the section, not indented
        with pytest.raises(
            SparseftError, match=r"settings \(sparsity\) sit at the top level.*indent them under"
        ):
            prune_config(recipe)
