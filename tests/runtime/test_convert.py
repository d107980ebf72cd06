"""Converted models generate like their dense source; archives load straight into SparseLinear."""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

from sparseft import formats
from sparseft.errors import SparseftError, SparseftWarning
from sparseft.hf import find_targets, weight_matrix
from sparseft.pruning.magnitude import magnitude_prune
from sparseft.quant.spec import QuantSpec, rtn_quantize
from sparseft.runtime import DenseLinear, SparseLinear, convert, sparsify_
from sparseft.runtime.bench import model_bytes
from sparseft.runtime.fuse import Slice

# This file tests the transformers path of the runtime (module swap); the own decoder has tests/runtime/models.
load = functools.partial(convert.load, decoder="transformers")

PROMPT = torch.tensor([[5, 17, 250, 3, 99, 42, 7]])


@torch.inference_mode()
def _greedy(model: torch.nn.Module, tokens: int = 24) -> list[int]:
    out = model.generate(
        PROMPT, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0
    )
    return out[0, PROMPT.shape[1] :].tolist()


@torch.inference_mode()
def _logits(model: torch.nn.Module) -> torch.Tensor:
    return model(PROMPT).logits.float()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _write_archive(
    model: torch.nn.Module, path: Path, int8: bool = False, spec: QuantSpec | None = None
) -> Path:
    targets = find_targets(model)
    spec = spec or (QuantSpec(8) if int8 else None)
    quantized = (
        {n: rtn_quantize(weight_matrix(m).detach(), spec) for n, m in targets.items()} if spec else None
    )
    path.mkdir()
    formats.write_bitmask(model, targets, path, quantized, spec.describe() if spec else None)
    return path


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sparsify_bf16_generates_like_dense(arch: str, pruned_model: Callable[..., torch.nn.Module]) -> None:
    dense = pruned_model(arch)
    sparse = copy.deepcopy(dense)
    summary = sparsify_(sparse)
    assert summary["layers"] == len(find_targets(dense))
    assert summary["sparse_bytes"] < 0.45 * summary["dense_bytes"]
    assert isinstance(sparse.get_output_embeddings(), DenseLinear)
    assert not any(m.training for m in sparse.modules())  # what replaced a module took its eval mode
    assert _greedy(sparse) == _greedy(dense)


def test_sparsify_int8_logits_are_close(pruned_model: Callable[..., torch.nn.Module]) -> None:
    dense = pruned_model()
    sparse = copy.deepcopy(dense)
    sparsify_(sparse, "int8")
    assert all(m.kind == "int8" for m in sparse.modules() if isinstance(m, SparseLinear))
    assert _relative(_logits(sparse), _logits(dense)) < 0.05


@pytest.mark.parametrize("tied", [False, True])
def test_int8_head(tmp_path: Path, tied: bool, pruned_model: Callable[..., torch.nn.Module]) -> None:
    dense = pruned_model(tie_word_embeddings=tied)
    if tied:
        dense.tie_weights()
    sparse = load(_write_archive(dense, tmp_path / "archive"), head_values="int8")
    head = sparse.get_output_embeddings()
    assert isinstance(head, SparseLinear) and head.kind == "int8"
    assert head.density() > 0.99  # every weight kept, only rounded
    # one byte a weight (not two), a mask bit padded to whole 64-bit words, 16 bytes a row (offset, scale, sum)
    rows, cols = dense.config.vocab_size, dense.config.hidden_size
    assert head.nbytes() <= rows * (cols + 8 * -(-cols // 64) + 16) + 72
    assert _relative(_logits(sparse), _logits(dense)) < 0.05
    assert len(_greedy(sparse)) == 24
    with pytest.raises(SparseftError, match="values must be"):
        sparsify_(copy.deepcopy(dense), head_values="int4")  # type: ignore[arg-type]


@pytest.mark.parametrize("tied", [False, True])
def test_load_archive_generates_like_dense(
    tmp_path: Path, tied: bool, pruned_model: Callable[..., torch.nn.Module]
) -> None:
    dense = pruned_model(tie_word_embeddings=tied)
    if tied:
        dense.tie_weights()
    archive = _write_archive(dense, tmp_path / "archive")
    sparse = load(archive)
    assert all(isinstance(sparse.get_submodule(n), (SparseLinear, Slice)) for n in find_targets(dense))
    assert not any(p.device.type == "meta" for p in sparse.parameters())
    if tied:
        assert sparse.get_output_embeddings().weight is sparse.get_input_embeddings().weight
    assert model_bytes(sparse) < 0.75 * model_bytes(dense)  # embeddings dominate at this toy size
    assert _greedy(sparse) == _greedy(dense)


def test_load_int8_archive(tmp_path: Path, pruned_model: Callable[..., torch.nn.Module]) -> None:
    dense = pruned_model()
    archive = _write_archive(dense, tmp_path / "archive", int8=True)
    sparse = load(archive)
    assert all(m.kind == "int8" for m in sparse.modules() if isinstance(m, SparseLinear))
    dequantized = formats.load_dir(archive, torch.bfloat16)
    assert _relative(_logits(sparse), _logits(dequantized)) < 0.05
    assert load(archive, values="bf16").model.layers[0].mlp.up_proj.kind == "bf16"


@pytest.mark.parametrize(
    "family", ["bloom", "falcon", "gemma", "gpt2", "gpt_neox", "mistral", "mpt", "opt", "phi3", "qwen3"]
)
def test_archives_of_other_families_load_and_decode(
    tmp_path: Path, family: str, family_model: Callable[[str], torch.nn.Module]
) -> None:
    dense = family_model(family)
    targets = find_targets(dense)
    with torch.no_grad():
        for module in targets.values():
            module.weight.copy_(magnitude_prune(module.weight, 0.6))
    reference = _logits(dense)
    for int8, tolerance in ((False, 0.02), (True, 0.05)):
        sparse = load(_write_archive(dense, tmp_path / f"{family}-{int8}", int8=int8))
        assert all(isinstance(sparse.get_submodule(n), (SparseLinear, Slice)) for n in targets)
        assert _relative(_logits(sparse), reference) < tolerance
        assert len(_greedy(sparse, tokens=4)) == 4


def _edit_config(archive: Path, **changes: object) -> None:
    meta = json.loads((archive / "config.json").read_text())
    meta["model_config"].update(changes)
    (archive / "config.json").write_text(json.dumps(meta))


def test_archive_of_a_different_model_is_refused(
    tmp_path: Path, pruned_model: Callable[..., torch.nn.Module]
) -> None:
    dense = pruned_model()
    wider = _write_archive(dense, tmp_path / "wider")
    _edit_config(wider, intermediate_size=dense.config.intermediate_size + 8)
    with pytest.raises(SparseftError, match="different model"):
        load(wider)
    shallower = _write_archive(dense, tmp_path / "shallower")
    _edit_config(shallower, num_hidden_layers=1)
    with pytest.raises(SparseftError, match="different model"):
        load(shallower)
    bigger_vocab = _write_archive(dense, tmp_path / "vocab")
    _edit_config(bigger_vocab, vocab_size=dense.config.vocab_size + 1)
    with pytest.raises(SparseftError, match="does not fit"):
        load(bigger_vocab)
    with pytest.raises(SparseftError, match="values must be"):
        load(wider, values="fp8")  # type: ignore[arg-type]
    with pytest.raises(SparseftError, match="bfloat16 or float32"):
        load(wider, dtype=torch.float16)


def test_archive_whose_biases_differ_from_its_model_is_refused(
    tmp_path: Path, pruned_model: Callable[..., torch.nn.Module]
) -> None:
    archive = _write_archive(pruned_model(), tmp_path / "archive")
    _edit_config(archive, attention_bias=True)  # the model now expects q/k/v/o biases the archive lacks
    with pytest.raises(SparseftError, match=r"lacks model\.layers\.0\.self_attn\.\w+_proj\.bias.*different"):
        load(archive)
    biased = pruned_model(attention_bias=True)
    archive = _write_archive(biased, tmp_path / "biased")
    _edit_config(archive, attention_bias=False)
    with pytest.raises(SparseftError, match=r"holds model\.layers\.0\.self_attn\.\w+_proj\.bias.*different"):
        load(archive)


@pytest.mark.parametrize("decoder", ["transformers", "sparseft"])
def test_load_int4_archive(
    decoder: str, tmp_path: Path, pruned_model: Callable[..., torch.nn.Module]
) -> None:
    dense = pruned_model()
    archive = _write_archive(dense, tmp_path / "archive", spec=QuantSpec(4, 32))
    sparse = convert.load(archive, decoder=decoder)
    kinds = {m.kind for m in sparse.modules() if isinstance(m, SparseLinear)}
    assert kinds == {"int4"} or (decoder == "sparseft" and kinds == {"int4", "bf16"})  # bf16: the head
    dequantized = formats.load_dir(archive, torch.bfloat16)
    with torch.inference_mode():
        logits = sparse(PROMPT).logits.float()
    assert _relative(logits, _logits(dequantized)) < 0.05


def test_int4_archives_the_kernels_cannot_run(
    tmp_path: Path, pruned_model: Callable[..., torch.nn.Module]
) -> None:
    archive = _write_archive(pruned_model(), tmp_path / "odd", spec=QuantSpec(4, 16))
    with pytest.warns(SparseftWarning, match="group size 16 run as int8"):
        assert {m.kind for m in load(archive).modules() if isinstance(m, SparseLinear)} == {"int8"}
    with pytest.raises(SparseftError, match="multiples of 32"):
        load(archive, values="int4")
    damaged = _write_archive(pruned_model(), tmp_path / "damaged", spec=QuantSpec(4, 32))
    _damage(damaged, "model.layers.0.mlp.up_proj.weight.compressed", lambda t: t[:-1])
    for decoder in ("transformers", "sparseft"):
        with pytest.raises(SparseftError, match="damaged"):
            convert.load(damaged, decoder=decoder)


def _damage(archive: Path, name: str, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
    from safetensors.torch import load_file, save_file

    for file in archive.glob("*.safetensors"):
        tensors = load_file(file)
        if name in tensors:
            tensors[name] = change(tensors[name])
            save_file(tensors, file, metadata={"format": "pt"})
            return
    raise AssertionError(f"{name} not in {archive}")


def _set_last_bit(mask: torch.Tensor) -> torch.Tensor:
    mask = mask.clone()
    mask[0, -1] |= 0x80
    return mask


@pytest.mark.parametrize("spec", [None, QuantSpec(4, 32)], ids=["bf16", "int4"])
@pytest.mark.parametrize(
    ("part", "change", "message"),
    [
        ("compressed", lambda t: t[:-1].clone(), "do not match|compressed holds"),
        ("row_offsets", lambda t: t.flip(0).clone(), "do not match"),
        ("bitmask", _set_last_bit, "beyond column 84"),
    ],
)
def test_damaged_archive_parts_are_refused(
    tmp_path: Path,
    pruned_model: Callable[..., torch.nn.Module],
    part: str,
    change: Callable[[torch.Tensor], torch.Tensor],
    message: str,
    spec: QuantSpec | None,
) -> None:
    dense = pruned_model(hidden_size=84)  # 84 columns: the last mask byte has spare bits a damage can set
    archive = _write_archive(dense, tmp_path / "archive", spec=spec)
    _damage(archive, f"model.layers.0.self_attn.q_proj.weight.{part}", change)
    with pytest.raises(SparseftError, match=message):
        load(archive)


@pytest.mark.parametrize(
    "quantization", [{"bits": 3}, {"group_size": 128}, {"bits": 4, "group_size": -1}, [8]]
)
def test_malformed_quantization_block_is_refused(
    tmp_path: Path, pruned_model: Callable[..., torch.nn.Module], quantization: object
) -> None:
    archive = _write_archive(pruned_model(), tmp_path / "archive", int8=True)
    meta = json.loads((archive / "config.json").read_text())
    meta["quantization"] = quantization
    (archive / "config.json").write_text(json.dumps(meta))
    with pytest.raises(SparseftError, match="malformed quantization"):
        load(archive)


def test_sparsify_refuses_models_not_on_the_cpu(pruned_model: Callable[..., torch.nn.Module]) -> None:
    model = transformers.AutoModelForCausalLM.from_config(pruned_model().config, dtype=torch.bfloat16).to(
        "meta"
    )
    with pytest.raises(SparseftError, match="CPU"):
        sparsify_(model)


def test_sparsify_any_module_by_named_targets() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    with torch.no_grad():
        for linear in (model[0], model[2]):
            linear.weight.copy_(magnitude_prune(linear.weight, 0.5))
    x = torch.randn(3, 64)
    with torch.inference_mode():
        expected = model(x)
    with pytest.raises(SparseftError, match="target 'up_proj' matches no linear layer"):
        sparsify_(model, targets=["up_proj"])
    summary = sparsify_(model, targets=["0"])
    assert summary["layers"] == 1
    assert isinstance(model[0], SparseLinear) and type(model[2]) is torch.nn.Linear
    with torch.inference_mode():
        assert _relative(model(x).float(), expected) < 1e-2  # bf16 values
