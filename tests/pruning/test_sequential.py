from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

from sparseft.errors import SparseftError
from sparseft.hf import find_targets, weight_matrix
from sparseft.pruning import sequential
from sparseft.pruning.masks import NM
from sparseft.pruning.obs import Hessian
from sparseft.pruning.sequential import PruneSettings, prune_model


def load(path: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def samples(vocab: int, n: int = 4, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(0))


def all_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _prune_every_target(model: torch.nn.Module, method: str) -> None:
    targets = find_targets(model)
    prune_model(model, targets, PruneSettings(method, 0.5), samples(model.config.vocab_size), progress=False)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "mpt", "gpt_neox", "qwen2"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_prunes_every_family_sequentially(
    make_model_dir: Callable[..., Path], arch: str, method: str, tmp_path: Path
) -> None:
    model = load(make_model_dir(arch))
    before = {n: t.clone() for n, t in model.state_dict().items()}
    targets = find_targets(model)
    prune_model(model, targets, PruneSettings(method, 0.5), samples(model.config.vocab_size), progress=False)

    for name, module in targets.items():
        w = weight_matrix(module)
        assert int((w == 0).sum()) == w.numel() // 2, name
    target_weights = {f"{n}.weight" for n in targets}
    for name, tensor in model.state_dict().items():
        if name not in target_weights:
            assert torch.equal(tensor, before[name]), f"{name} changed but is not a target"
    assert all_hooks(model) == 0

    model.save_pretrained(tmp_path)
    reloaded = load(tmp_path)
    ids = samples(model.config.vocab_size, 1, 16)
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def test_n_of_m_on_a_whole_model(make_model_dir: Callable[..., Path]) -> None:
    model = load(make_model_dir("llama"))
    targets = find_targets(model)
    prune_model(
        model,
        targets,
        PruneSettings("sparsegpt", 0.5, NM(2, 4)),
        samples(model.config.vocab_size),
        progress=False,
    )
    for module in targets.values():
        w = weight_matrix(module)
        assert ((w == 0).view(w.shape[0], -1, 4).sum(-1) == 2).all()


def test_layers_reading_one_input_share_one_hessian(
    make_model_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load(make_model_dir("llama", layers=1))
    calls: list[int] = []
    original = Hessian.add_batch
    monkeypatch.setattr(Hessian, "add_batch", lambda self, x: (calls.append(id(self)), original(self, x))[1])
    prune_model(
        model,
        find_targets(model),
        PruneSettings("sparsegpt", 0.5),
        samples(model.config.vocab_size, n=3),
        progress=False,
    )
    # q/k/v share one, gate/up share one, o and down have their own: 4 accumulators for 7 layers
    assert len(set(calls)) == 4
    assert len(calls) == 4 * 3


def test_hooks_removed_when_pruning_fails(
    make_model_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load(make_model_dir("llama"))

    def broken(*args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(sequential, "prune_layer", broken)
    with pytest.raises(RuntimeError, match="boom"):
        _prune_every_target(model, "wanda")
    assert all_hooks(model) == 0


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_layer_no_token_reaches_is_one_error_naming_it(
    method: str, make_model_dir: Callable[..., Path]
) -> None:
    model = load(make_model_dir("llama"))
    # like a mixture-of-experts expert that no calibration token was routed to
    model.model.layers[1].mlp.idle_expert = torch.nn.Linear(64, 64)
    targets = find_targets(model)
    targets["model.layers.1.mlp.idle_expert"] = model.model.layers[1].mlp.idle_expert
    with pytest.raises(
        SparseftError, match="layer model.layers.1.mlp.idle_expert saw no calibration"
    ) as info:
        prune_model(
            model, targets, PruneSettings(method, 0.5), samples(model.config.vocab_size), progress=False
        )
    assert "--ignore model.layers.1.mlp.idle_expert" in str(info.value) and "\n" not in str(info.value)


def test_inf_activations_are_one_error_naming_the_layer(make_model_dir: Callable[..., Path]) -> None:
    model = load(make_model_dir("llama"))
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[0, 0] = float("inf")  # what float16 overflow gives
    with pytest.raises(SparseftError, match="inputs of model.layers.0.self_attn.o_proj hold inf or NaN"):
        _prune_every_target(model, "sparsegpt")
    assert all_hooks(model) == 0


def test_targets_outside_blocks_are_calibrated_on_the_pruned_model(
    make_model_dir: Callable[..., Path],
) -> None:
    model = load(make_model_dir("opt"))
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untied: a target alone
    targets = find_targets(model, targets=["lm_head", "fc1"])
    assert "lm_head" in targets
    prune_model(model, targets, PruneSettings("wanda", 0.5), samples(model.config.vocab_size), progress=False)
    assert float((model.lm_head.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


def test_magnitude_needs_no_samples(make_model_dir: Callable[..., Path]) -> None:
    model = load(make_model_dir("gpt2"))
    targets = find_targets(model)
    prune_model(model, targets, PruneSettings("magnitude", 0.7), None, progress=False)
    for module in targets.values():
        w = weight_matrix(module)
        assert int((w == 0).sum()) == round(0.7 * w.numel())


def tiny_t5() -> transformers.T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    return transformers.T5ForConditionalGeneration(config).eval()


def tiny_whisper() -> transformers.WhisperForConditionalGeneration:
    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
        max_source_positions=32, max_target_positions=32, pad_token_id=0, decoder_start_token_id=1,
    )  # fmt: skip
    return transformers.WhisperForConditionalGeneration(config).eval()


def encdec_inputs(model: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    if isinstance(model, transformers.WhisperForConditionalGeneration):
        encoder = {"input_features": lambda: torch.randn(1, 16, 64, generator=gen)}
    else:
        encoder = {"input_ids": lambda: torch.randint(0, 100, (1, 12), generator=gen)}
    return [
        {
            **{k: f() for k, f in encoder.items()},
            "decoder_input_ids": torch.randint(0, 100, (1, 7), generator=gen),
        }
        for _ in range(3)
    ]


@pytest.mark.parametrize("make", [tiny_t5, tiny_whisper])
def test_driver_feeds_every_block_what_the_model_would(make: Callable[[], torch.nn.Module]) -> None:
    """With nothing pruned, each target must see exactly the inputs of an ordinary forward pass; this checks the
    recording of T5's shared position bias and of the decoder's cross-attention inputs."""
    model = make()
    targets = find_targets(model)
    inputs = encdec_inputs(model)
    expected: dict[str, list[torch.Tensor]] = {n: [] for n in targets}
    handles = [
        m.register_forward_hook(lambda mod, args, out, n=n: expected[n].append(args[0].clone()))
        for n, m in targets.items()
    ]
    with torch.no_grad():
        for sample in inputs:
            model(**sample)
    for h in handles:
        h.remove()

    seen: dict[str, list[torch.Tensor]] = {n: [] for n in targets}

    def record(modules: dict[str, torch.nn.Module], run: Callable[[], None]) -> None:
        hooks = [
            m.register_forward_hook(lambda mod, args, out, n=n: seen[n].append(args[0].clone()))
            for n, m in modules.items()
        ]
        run()
        for h in hooks:
            h.remove()

    sequential.run_sequential(model, targets, inputs, record, progress=False)
    assert any("EncDecAttention" in n or "encoder_attn" in n for n in targets)
    for name in targets:
        assert len(seen[name]) == len(expected[name]) == 3, name
        for got, want in zip(seen[name], expected[name], strict=True):
            torch.testing.assert_close(got, want, msg=name)


@pytest.mark.parametrize("make", [tiny_t5, tiny_whisper])
def test_encoder_decoder_pruning_hits_target_everywhere(make: Callable[[], torch.nn.Module]) -> None:
    model = make()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    targets = find_targets(model)
    prune_model(model, targets, PruneSettings("sparsegpt", 0.5), encdec_inputs(model), progress=False)
    for name, module in targets.items():
        assert float((module.weight == 0).float().mean()) == 0.5, name
    names = {f"{n}.weight" for n in targets}
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items() if n not in names)
    assert all_hooks(model) == 0
