from collections.abc import Callable
from pathlib import Path

import pytest
import transformers

from sparseft.errors import SparseftError
from sparseft.hf import (
    find_block_lists,
    find_blocks,
    find_targets,
    fused_weights,
    load_model,
    load_tokenizer,
    max_positions,
    weight_matrix,
)


@pytest.mark.parametrize(
    ("arch", "prefix"),
    [
        ("llama", "model.layers"),
        ("gpt2", "transformer.h"),
        ("opt", "model.decoder.layers"),
        ("mpt", "transformer.blocks"),
        ("gpt_neox", "gpt_neox.layers"),
        ("qwen2", "model.layers"),
    ],
)
def test_finds_blocks_by_shape(make_model_dir: Callable[..., Path], arch: str, prefix: str) -> None:
    model = load_model(str(make_model_dir(arch)))
    name, blocks = find_blocks(model)
    assert name == prefix
    assert len(blocks) == 2
    assert [n for n, _ in find_block_lists(model)] == [prefix]


def test_default_targets_are_block_linears_only(make_model_dir: Callable[..., Path]) -> None:
    model = load_model(str(make_model_dir("llama")))
    targets = find_targets(model)
    assert len(targets) == 2 * 7
    assert all(n.startswith("model.layers.") for n in targets)


def test_fused_expert_weights_are_found(make_model_dir: Callable[..., Path]) -> None:
    mixtral = load_model(str(make_model_dir("mixtral")))
    fused = fused_weights(mixtral)
    assert fused and all(".experts." in name for name in fused)
    # the experts hold most of the weights, and no linear layer targets them
    assert sum(fused.values()) > sum(weight_matrix(m).numel() for m in find_targets(mixtral).values())
    assert fused_weights(load_model(str(make_model_dir("llama")))) == {}


def test_a_tied_lm_head_is_refused_as_a_target(make_model_dir: Callable[..., Path]) -> None:
    model = load_model(str(make_model_dir("llama")))
    model.tie_weights()
    model.lm_head.weight = model.model.embed_tokens.weight
    with pytest.raises(SparseftError, match="lm_head shares its weight with the token embeddings"):
        find_targets(model, targets=["lm_head"])
    assert "lm_head" not in find_targets(model)  # not a default target


def test_a_directory_without_tokenizer_files_is_refused(
    make_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    for name in make_model_dir("gpt2").iterdir():
        if name.name in ("config.json", "model.safetensors"):
            (tmp_path / name.name).write_bytes(name.read_bytes())
    with pytest.raises(SparseftError, match="has no tokenizer"):
        load_tokenizer(str(tmp_path))


def test_conv1d_weight_is_seen_as_out_by_in(make_model_dir: Callable[..., Path]) -> None:
    model = load_model(str(make_model_dir("gpt2")))
    c_fc = model.transformer.h[0].mlp.c_fc
    assert weight_matrix(c_fc).shape == (c_fc.nf, c_fc.weight.shape[0])


def test_targets_by_name_class_and_regex(make_model_dir: Callable[..., Path]) -> None:
    model = load_model(str(make_model_dir("llama")))
    assert set(find_targets(model, ["q_proj"])) == {
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    }
    assert "lm_head" in find_targets(model, ["Linear"])
    regex = find_targets(model, [r"re:model\.layers\.1\.mlp\..*"])
    assert set(regex) == {f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    ignored = find_targets(model, ignore=["down_proj", "re:.*self_attn"])
    assert set(ignored) == {f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in ("gate_proj", "up_proj")}


def test_targets_matching_nothing_is_an_error(make_model_dir: Callable[..., Path]) -> None:
    model = load_model(str(make_model_dir("llama")))
    with pytest.raises(SparseftError, match="matches"):
        find_targets(model, ["no_such_layer"])
    with pytest.raises(SparseftError, match="matches"):
        find_targets(model, ignore=["Linear"])


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SparseftError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(SparseftError, match="config.json"):
        load_model(str(tmp_path))


def test_max_positions_reads_each_family_key() -> None:
    assert max_positions(transformers.GPT2Config(n_positions=77)) == 77
    assert max_positions(transformers.LlamaConfig(max_position_embeddings=99)) == 99
