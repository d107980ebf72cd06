"""The own Llama-family decoder against the transformers model of the same weights: logits at prefill and over
32 decoding steps, greedy text, batched against one-by-one, and what it refuses."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from sparseft import formats
from sparseft.errors import SparseftError
from sparseft.hf import find_targets, weight_matrix
from sparseft.io import write_json
from sparseft.pruning.magnitude import magnitude_prune
from sparseft.quant.spec import QuantSpec, rtn_quantize
from sparseft.runtime import convert, dispatch
from sparseft.runtime.models import LlamaDecoder, ops

_SIZES: dict[str, Any] = dict(
    hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=300, max_position_embeddings=256, initializer_range=0.1,
)  # fmt: skip

# One tiny config per covered variant: grouped-query attention, tied and untied embeddings, q/k/v biases,
# rope scaling, per-head q/k norms, stacked q/k/v and gate/up with partial rotary, sliding windows.
CONFIGS: dict[str, Any] = {
    "llama": lambda: transformers.LlamaConfig(**_SIZES),
    "llama-tied": lambda: transformers.LlamaConfig(**_SIZES, tie_word_embeddings=True),
    "llama3-rope": lambda: transformers.LlamaConfig(
        **_SIZES,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),  # fmt: skip
    "llama-linear-rope": lambda: transformers.LlamaConfig(
        **_SIZES, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    ),
    "mistral": lambda: transformers.MistralConfig(**_SIZES, sliding_window=12),
    "qwen2": lambda: transformers.Qwen2Config(**_SIZES, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**_SIZES, head_dim=32),
    "phi3": lambda: transformers.Phi3Config(
        **_SIZES,
        pad_token_id=0,
        eos_token_id=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    ),  # fmt: skip
}


def reference(name: str, dtype: torch.dtype = torch.bfloat16, sparsity: float = 0.7) -> Any:
    """A tiny transformers model of `name`, its block linears magnitude-pruned, with random biases and norms (so
    that none of them is a no-op the decoder could get wrong unseen)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation="sdpa")
    with torch.no_grad():
        for module in find_targets(model).values():
            module.weight.copy_(magnitude_prune(module.weight, sparsity))
            if module.bias is not None:
                module.bias.normal_(0, 0.5)
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.uniform_(0.5, 1.5)
    return model.to(dtype).eval()


def archive(model: Any, path: Path, int8: bool = False, spec: QuantSpec | None = None) -> Path:
    targets = find_targets(model)
    spec = spec or (QuantSpec(8) if int8 else None)
    quantized = (
        {n: rtn_quantize(weight_matrix(m).detach(), spec) for n, m in targets.items()} if spec else None
    )
    path.mkdir()
    formats.write_bitmask(model, targets, path, quantized, spec.describe() if spec else None)
    (path / "generation_config.json").unlink(missing_ok=True)
    return path


@torch.inference_mode()
def _steps(model: Any, prompt: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Logits (steps + 1, V) of the prompt's last token and of each of `tokens` fed after it one at a time, through
    a transformers model (dynamic cache) or the own decoder (its static cache)."""
    own = isinstance(model, LlamaDecoder)
    cache = (
        model.new_cache(1, prompt.shape[1] + len(tokens))
        if own
        else transformers.DynamicCache(config=model.config)
    )

    def run(ids: torch.Tensor) -> torch.Tensor:
        if own:
            return model(ids, cache=cache).logits[0, -1].float()
        return model(ids, past_key_values=cache, use_cache=True).logits[0, -1].float()

    return torch.stack([run(prompt), *(run(torch.tensor([[t]])) for t in tokens)])


@torch.inference_mode()
def _greedy(model: Any, steps: int) -> list[int]:
    return model.generate(PROMPT, max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0)[
        0, PROMPT.shape[1] :
    ].tolist()


def _compare(reference_model: Any, own: LlamaDecoder, tolerance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Both models' logits over the reference's greedy text (so a near-tie cannot send them down different
    texts), each step within `tolerance` of the reference."""
    tokens = _greedy(reference_model, 32)
    expected, got = _steps(reference_model, PROMPT, tokens), _steps(own, PROMPT, tokens)
    for step in range(len(expected)):
        assert _relative(got[step], expected[step]) < tolerance, step
    return expected, got


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


PROMPT = torch.tensor([[5, 17, 42, 8, 99, 3, 250, 61, 7, 12, 180, 33, 2, 91]])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_in_float32(name: str, tmp_path: Path) -> None:
    dense = reference(name, torch.float32)
    own = convert.load(archive(dense, tmp_path / "a"), dtype=torch.float32, decoder="sparseft")
    assert isinstance(own, LlamaDecoder)
    # the bf16 kernels multiply bf16 weights by bf16-rounded inputs: make the reference's linears do the same
    with torch.no_grad():
        for module in find_targets(dense).values():
            module.weight.copy_(module.weight.to(torch.bfloat16).float())
            module.register_forward_pre_hook(lambda _, args: (args[0].to(torch.bfloat16).float(),))
    # An input that sums in another order may round to the neighbouring bf16 value: far below 1e-5 otherwise. Qwen3's
    # per-head q/k norms magnify such a flip most (about 6e-3 here with the scalar and AVX2 kernels alike).
    _compare(dense, own, 1e-2 if name == "qwen3" else 5e-3)
    assert _greedy(own, 64) == _greedy(dense, 64)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_in_bf16(name: str, tmp_path: Path) -> None:
    dense = reference(name)
    own = convert.load(archive(dense, tmp_path / "a"), decoder="sparseft")
    expected, got = _compare(dense, own, 0.03)
    # greedy choices: the same token wherever the reference's lead over its second choice is clear of bf16 noise
    top = expected.topk(2, dim=-1).values
    clear = (top[:, 0] - top[:, 1]) > 0.05 * expected.std(-1)
    assert clear.float().mean() > 0.8
    assert torch.equal(got.argmax(-1)[clear], expected.argmax(-1)[clear])


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_int8_values_stay_close(name: str, tmp_path: Path) -> None:
    dense = reference(name)
    own = convert.load(archive(dense, tmp_path / "a", int8=True), decoder="sparseft")
    assert own.blocks[0].qkv.kind == "int8"
    _compare(dense, own, 0.06)


@pytest.mark.parametrize("group_size", [32, 128])
def test_an_int4_archive_runs_as_int4_close_to_its_dequantized_model(group_size: int, tmp_path: Path) -> None:
    dense = reference("llama")
    path = archive(dense, tmp_path / "a", spec=QuantSpec(4, group_size))
    own = convert.load(path, decoder="sparseft")
    assert own.blocks[0].qkv.kind == "int4" and own.blocks[0].qkv.group_size == group_size
    # the reference is the archive's own dequantized model: what differs is the kernels' int8 activations
    expected, got = _compare(formats.load_dir(path, torch.bfloat16).eval(), own, 0.06)
    top = expected.topk(2, dim=-1).values
    clear = (top[:, 0] - top[:, 1]) > 0.1 * expected.std(-1)  # leads the int8 activations cannot overturn
    assert clear.float().mean() > 0.5
    assert torch.equal(got.argmax(-1)[clear], expected.argmax(-1)[clear])
    # asked for, other values run the same archive (dequantized, then packed their way)
    assert convert.load(path, values="int8", decoder="sparseft").blocks[0].qkv.kind == "int8"


def test_a_pruned_hf_checkpoint_loads_too(tmp_path: Path) -> None:
    dense = reference("qwen3")
    dense.save_pretrained(tmp_path / "hf")
    own = convert.load(tmp_path / "hf", decoder="auto")
    from_archive = convert.load(archive(dense, tmp_path / "a"))
    assert isinstance(own, LlamaDecoder) and own.decoder_name == "sparseft llama"
    with torch.inference_mode():
        assert torch.equal(own(PROMPT).logits, from_archive(PROMPT).logits)


@pytest.mark.parametrize("name", ["llama", "mistral", "phi3"])
def test_batched_generation_equals_one_by_one(name: str, tmp_path: Path) -> None:
    own = convert.load(archive(reference(name), tmp_path / "a"))
    prompts = [PROMPT[0, :14], PROMPT[0, 3:9], PROMPT[0, :2]]
    alone = [own.generate(p[None], max_new_tokens=20, eos_token_id=[])[0, len(p) :] for p in prompts]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :], mask[row, width - len(p) :] = p, 1
    batched = own.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[])[:, width:]
    for row in range(len(prompts)):
        assert batched[row].tolist() == alone[row].tolist(), row
    # rows of one length, no padding: the same again
    same = torch.stack([PROMPT[0, :9], PROMPT[0, 5:14]])
    together = own.generate(same, max_new_tokens=20, eos_token_id=[])[:, 9:]
    for row in range(2):
        assert (
            together[row].tolist()
            == own.generate(same[row : row + 1], max_new_tokens=20, eos_token_id=[])[0, 9:].tolist()
        )


def test_padded_forward_without_cache_matches_each_row(tmp_path: Path) -> None:
    own = convert.load(archive(reference("llama"), tmp_path / "a"), dtype=torch.float32)
    short = PROMPT[:, 5:]
    ids = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), PROMPT])
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.inference_mode():
        both = own(ids, attention_mask=mask).logits
        alone = own(short).logits
    assert _relative(both[0, 5:], alone[0]) < 1e-5
    assert not both.isnan().any()


def test_generation_stops_at_the_end_token_and_pads(tmp_path: Path) -> None:
    own = convert.load(archive(reference("llama"), tmp_path / "a"))
    free = own.generate(PROMPT, max_new_tokens=10, eos_token_id=[])[0, PROMPT.shape[1] :]
    end = int(free[3])
    out = own.generate(PROMPT, max_new_tokens=10, eos_token_id=end, pad_token_id=0)[0, PROMPT.shape[1] :]
    first = free.tolist().index(end)
    assert out[: first + 1].tolist() == free[: first + 1].tolist()
    assert len(out) == first + 1  # every row ended: generation stops


def test_sampling_is_seeded_and_bounded(tmp_path: Path) -> None:
    own = convert.load(archive(reference("llama"), tmp_path / "a"))

    def sample(seed: int, **options: Any) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        out = own.generate(
            PROMPT, max_new_tokens=12, do_sample=True, generator=generator, eos_token_id=[], **options
        )
        return out[0, PROMPT.shape[1] :].tolist()

    assert sample(1, temperature=1.5) == sample(1, temperature=1.5)
    greedy = own.generate(PROMPT, max_new_tokens=12, eos_token_id=[])[0, PROMPT.shape[1] :].tolist()
    assert sample(2, top_k=1) == greedy  # one candidate left: sampling is greedy
    assert sample(3, top_p=1e-6) == greedy
    with pytest.raises(SparseftError, match="temperature"):
        own.generate(PROMPT, do_sample=True, temperature=0.0)


def test_streamer_and_callback_see_every_token(tmp_path: Path) -> None:
    own = convert.load(archive(reference("llama"), tmp_path / "a"))
    seen: list[torch.Tensor] = []

    class Streamer:
        def put(self, ids: torch.Tensor) -> None:
            seen.append(ids)

        def end(self) -> None:
            seen.append(torch.tensor([-1]))

    steps: list[int] = []
    out = own.generate(
        PROMPT,
        max_new_tokens=5,
        eos_token_id=[],
        streamer=Streamer(),
        callback=lambda t: steps.append(int(t[0])),
    )
    assert torch.equal(seen[0], PROMPT) and int(seen[-1][0]) == -1
    assert [int(t[0]) for t in seen[1:-1]] == steps == out[0, PROMPT.shape[1] :].tolist()


def test_the_cache_length_is_a_clear_error(tmp_path: Path) -> None:
    own = convert.load(archive(reference("llama"), tmp_path / "a"))
    cache = own.new_cache(1, PROMPT.shape[1] + 1)
    with torch.inference_mode():
        own(PROMPT, cache=cache)
        own(PROMPT[:, :1], cache=cache)
        with pytest.raises(SparseftError, match="exceed the cache"):
            own(PROMPT[:, :1], cache=cache)


def test_other_architectures_and_uncovered_features_fall_back(tmp_path: Path, pruned_model: Any) -> None:
    gpt2 = convert.load(archive(pruned_model("gpt2"), tmp_path / "gpt2"))
    assert not isinstance(gpt2, LlamaDecoder)
    assert gpt2.decoder_name == "transformers (gpt2 has no own decoder)"
    with pytest.raises(SparseftError, match="gpt2 has no own decoder"):
        convert.load(tmp_path / "gpt2", decoder="sparseft")
    yarn = reference("llama")
    yarn.config.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}
    path = archive(yarn, tmp_path / "yarn")
    with pytest.warns(UserWarning, match="rope type 'yarn' is not covered"):
        model = convert.load(path)
    assert model.decoder_name.startswith("transformers (its rope type")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(convert.load(path, decoder="transformers"), torch.nn.Module)


def test_a_checkpoint_for_another_model_is_a_clear_error(tmp_path: Path) -> None:
    path = archive(reference("llama"), tmp_path / "a")
    config = formats.shards.read_json(path / "config.json")
    config["model_config"]["intermediate_size"] = 256
    write_json(path / "config.json", config)
    with pytest.raises(SparseftError, match="was written for a different model"):
        convert.load(path)


needs_avx2 = pytest.mark.skipif(
    dispatch.best_isa() not in ("avx2", "avx512"), reason="the decoding attention op needs AVX2"
)


@needs_avx2
def test_decoding_steps_take_the_attention_op(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own = convert.load(archive(reference("llama"), tmp_path / "a"))
    own.one_call_steps = False  # the Python block's steps
    calls: list[int] = []
    original = dispatch.store_and_attend

    def counted(*args: Any) -> torch.Tensor:
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(dispatch, "store_and_attend", counted)
    own.generate(PROMPT, max_new_tokens=4, eos_token_id=[])
    assert len(calls) == 3 * own.cfg.layers  # the prefill takes SDPA, each later step the op


class _Counted:
    """A LayerStack whose steps are counted."""

    def __init__(self, stack: Any) -> None:
        self.stack, self.calls, self.step_rows_calls = stack, 0, 0

    def step(self, *args: Any) -> torch.Tensor:
        self.calls += 1
        return self.stack.step(*args)

    def step_rows(self, *args: Any) -> torch.Tensor:
        self.step_rows_calls += 1
        return self.stack.step_rows(*args)


@needs_avx2
@pytest.mark.parametrize(
    ("name", "spec"),
    [
        ("llama", None),
        ("mistral", None),
        ("qwen2", QuantSpec(8)),
        ("qwen3", None),
        ("llama-tied", QuantSpec(4, 32)),
    ],
)
def test_one_call_steps_give_the_python_blocks_bits(
    name: str, spec: QuantSpec | None, tmp_path: Path
) -> None:
    own = convert.load(archive(reference(name), tmp_path / "a", spec=spec))
    prompts = torch.stack([PROMPT[0], PROMPT[0].flip(0)])  # two rows at one position: batched steps too
    tokens = _greedy(own, 40)  # past mistral's window of 12
    assert own._one_call(1) and own._one_call(2)
    own._stack = counted = _Counted(own._stack)

    def batched() -> list[torch.Tensor]:
        seen: list[torch.Tensor] = []
        own.generate(
            prompts,
            max_new_tokens=40,
            eos_token_id=[],
            logits_filter=lambda _, x: seen.append(x.clone()) or x,
        )
        return seen

    fused, fused_batch = _steps(own, PROMPT, tokens), batched()
    assert counted.calls == len(tokens) + 39
    own.one_call_steps = False
    assert torch.equal(fused, _steps(own, PROMPT, tokens))
    assert all(torch.equal(a, b) for a, b in zip(fused_batch, batched(), strict=True))
    assert counted.calls == len(tokens) + 39


@needs_avx2
@pytest.mark.parametrize(("name", "spec"), [("llama", None), ("mistral", None), ("qwen2", QuantSpec(8))])
def test_one_call_slot_steps_give_the_python_blocks_bits(
    name: str, spec: QuantSpec | None, tmp_path: Path
) -> None:
    # a server's running requests: three texts at lengths of their own, stepped in another order than their slots,
    # past mistral's window of 12
    own = convert.load(archive(reference(name), tmp_path / "a", spec=spec))
    own._stack = counted = _Counted(own._one_call(3) and own._stack)

    def steps() -> list[torch.Tensor]:
        slots = own.new_slots(3, 40)
        with torch.inference_mode():
            for slot, length in ((2, 3), (0, 7), (1, 14)):
                view = slots.view(slot)
                own(PROMPT[:, :length], cache=view)
                slots.keep(slot, view)
            seen, tokens = [], torch.tensor([[5], [6], [7]])
            for _ in range(20):
                logits = own(tokens, cache=slots.step([1, 2, 0])).logits
                seen.append(logits)
                tokens = logits[:, -1].argmax(-1, keepdim=True)
        assert slots.lengths == [27, 34, 23]
        return seen

    one_call = steps()
    assert counted.step_rows_calls == 20
    own.one_call_steps = False
    assert all(torch.equal(a, b) for a, b in zip(one_call, steps(), strict=True))
    assert counted.step_rows_calls == 20


@needs_avx2
def test_one_call_steps_are_left_to_python_where_they_do_not_apply(tmp_path: Path) -> None:
    path = archive(reference("llama"), tmp_path / "a")
    assert not convert.load(path, dtype=torch.float32)._one_call(1)  # float32 model
    assert not convert.load(archive(reference("phi3"), tmp_path / "b"))._one_call(1)  # partial rotary
    own = convert.load(path)
    assert own._one_call(8) and not own._one_call(9)  # the step takes bf16 batches of 8 rows at most
    assert not convert.load(path, values="int8")._one_call(33)
    own.to(torch.float32)  # cast after use: the step is built again, and refused
    assert not own._one_call(1)


@needs_avx2
def test_stubbed_linears_give_zeros_in_one_call_steps(tmp_path: Path) -> None:
    own = convert.load(archive(reference("llama"), tmp_path / "a"))
    own.stub_linears = True
    cache = own.new_cache(1, 2)
    with torch.inference_mode():
        own(PROMPT[:, :1], cache=cache)
        logits = own(PROMPT[:, 1:2], cache=cache).logits
        # every linear gave zeros, so the last hidden state is the token's embedding
        expected = own.head(ops.rms_norm(own.embed[PROMPT[:, 1:2]], own.norm, own.cfg.eps))
    assert torch.equal(logits, expected)
