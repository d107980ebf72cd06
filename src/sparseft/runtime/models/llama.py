"""The runtime's own decoder for the Llama family: Llama 2/3.x (rope scaling "linear" and "llama3" included),
Mistral, Qwen2/2.5 (q/k/v biases), Qwen3 (per-head q/k norms) and Phi-3 (stacked q/k/v and gate/up, partial
rotary).

Each block is RMSNorm → q/k/v as one packed linear → (Qwen3's head norms) → rotary → static KV cache → attention →
o_proj → RMSNorm → gate/up as one packed linear → SiLU(gate)·up → down_proj, written out as calls on tensors: no
module tree per layer, no cache classes, no hooks. It is built from config.json and the checkpoint's tensors
(`build`), and checked in the tests against the transformers model of the same weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from sparseft.errors import SparseftError
from sparseft.runtime import dispatch
from sparseft.runtime.heap import release_freed_memory
from sparseft.runtime.linear import SparseLinear
from sparseft.runtime.models import ops, step
from sparseft.runtime.models.cache import Cache, KVCache, Masks, SlotCache, SlotStep
from sparseft.runtime.packing import Values
from sparseft.runtime.weights import CheckpointWeights, lm_head, stacked_linear

ARCHITECTURES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})


class NotCovered(Exception):
    """A model this decoder does not run (the reason is the message); the caller falls back to transformers.
    `listed`: the architecture is one of ours, and only a feature of this model is not covered."""

    def __init__(self, reason: str, listed: bool = True) -> None:
        super().__init__(reason)
        self.listed = listed


@dataclass(frozen=True)
class LlamaConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    rotary_dim: int
    inv_freq: tuple[float, ...]  # rotary frequencies, scaling applied
    windows: tuple[int | None, ...]  # per layer: the sliding window, None for full attention
    max_positions: int
    tie_embeddings: bool
    head_norms: bool  # Qwen3
    stacked: bool  # Phi-3 stores q/k/v and gate/up stacked in its own weights


def _rope(hf: Any, head_dim: int) -> tuple[int, tuple[float, ...]]:
    """Rotary dimensions and frequencies of `hf`: the formulas of the default, linear and llama3 rope
    types (Meta's Llama 3.1 reference code); any other type is not covered."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    scaling = getattr(hf, "rope_scaling", None)
    if isinstance(scaling, dict):
        params = {**scaling, **params}
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))
    factor = float(params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0) or 1.0))
    dim = int(head_dim * factor)
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if kind == "linear":
        inv = inv / float(params["factor"])
    elif kind == "llama3":
        scale, low, high = (float(params[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
        old = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / scale, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / scale + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        inv = torch.where(medium, smoothed, scaled)
    elif kind != "default":
        raise NotCovered(f"its rope type {kind!r} is not covered")
    return dim, tuple(inv.tolist())


def llama_config(hf: Any) -> LlamaConfig:
    """Our config from a transformers config of one of `ARCHITECTURES`; NotCovered names what is not."""
    arch = hf.model_type
    if arch not in ARCHITECTURES:
        raise NotCovered(f"{arch} has no own decoder", listed=False)
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise NotCovered(f"its activation {hf.hidden_act!r} is not covered")
    heads = hf.num_attention_heads
    kv_heads = getattr(hf, "num_key_value_heads", None) or heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    rotary_dim, inv_freq = _rope(hf, head_dim)
    layers = hf.num_hidden_layers
    window = getattr(hf, "sliding_window", None)
    kinds = getattr(hf, "layer_types", None)
    if kinds is not None:  # Qwen2/3: per-layer "full_attention" or "sliding_attention"
        windows = tuple(window if kind == "sliding_attention" else None for kind in kinds)
    else:  # Mistral, Phi-3: every layer
        windows = (window,) * layers
    return LlamaConfig(
        arch=arch,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        eps=float(hf.rms_norm_eps),
        rotary_dim=rotary_dim,
        inv_freq=inv_freq,
        windows=windows,
        max_positions=int(getattr(hf, "max_position_embeddings", 0) or 0),
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        head_norms=arch == "qwen3",
        stacked=arch == "phi3",
    )


class Block(nn.Module):
    """One decoder layer's weights: two packed linears per half, the norms."""

    def __init__(
        self,
        qkv: SparseLinear,
        o: SparseLinear,
        gate_up: SparseLinear,
        down: SparseLinear,
        norms: tuple[torch.Tensor, torch.Tensor],
        head_norms: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> None:
        super().__init__()
        self.qkv, self.o, self.gate_up, self.down = qkv, o, gate_up, down
        self.input_norm = nn.Parameter(norms[0], requires_grad=False)
        self.post_norm = nn.Parameter(norms[1], requires_grad=False)
        self.q_norm = self.k_norm = None
        if head_norms is not None:
            self.q_norm = nn.Parameter(head_norms[0], requires_grad=False)
            self.k_norm = nn.Parameter(head_norms[1], requires_grad=False)


@dataclass
class CausalOutput:
    """What a forward returns: the logits, under the name transformers uses, so evaluation code reads both."""

    logits: torch.Tensor


class LlamaDecoder(nn.Module):
    """A Llama-family model on the sparse runtime. `forward` gives logits (with a `KVCache`, it continues the cached
    text); `generate` decodes."""

    decoder_name = "sparseft llama"
    # False: decoding steps go through the Python blocks even where one C++ call could take them (models/step.py);
    # for comparisons and debugging, the two give the same bits.
    one_call_steps = True
    # For measurement only: every linear of a one-call step gives zeros (benchmarks/cpu_decode.py times the rest).
    stub_linears = False
    _layers: list[Block]
    _inv_freq: torch.Tensor

    def __init__(
        self,
        config: LlamaConfig,
        hf_config: Any,
        embed: torch.Tensor,
        blocks: list[Block],
        norm: torch.Tensor,
        head: nn.Module,
        generation_config: Any = None,
    ) -> None:
        super().__init__()
        self.cfg = config
        self.config = hf_config  # the transformers config, for code that reads model.config (context length)
        self.generation_config = generation_config
        self.embed = nn.Parameter(embed, requires_grad=False)
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.Parameter(norm, requires_grad=False)
        self.head = head
        self.scale = config.head_dim**-0.5
        self._layers = list(blocks)  # typed, for the loop; the ModuleList registers them
        self._inv_freq = torch.tensor(config.inv_freq, dtype=torch.float32)
        self._cos = self._sin = torch.empty(0)
        self.value_kinds = {b.qkv.kind for b in blocks}
        # the C++ decoding step (models/step.py), built on first use; False: not this model
        self._stack: Any = None

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def _apply(self, fn: Any, recurse: bool = True) -> LlamaDecoder:
        self._stack = None  # moved or cast: the step holds the old tensors
        return super()._apply(fn, recurse)

    # ---- positions -------------------------------------------------------------------------------------

    def _rotary_tables(self, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for positions [0, upto), in the model's dtype, grown on demand (a 128k-position table of
        a long-context model would be most of a gigabyte)."""
        if self._cos.shape[0] < upto:
            size = max(upto, 2 * self._cos.shape[0], 256)
            # as transformers: products in float32, cos/sin of the doubled frequencies, then the model's dtype
            freqs = torch.arange(size, dtype=torch.float32)[:, None] * self._inv_freq[None, :]
            angles = torch.cat((freqs, freqs), dim=-1)
            self._cos = angles.cos().to(self.dtype)
            self._sin = angles.sin().to(self.dtype)
        return self._cos, self._sin

    def _angles(
        self, batch: int, tokens: int, start: int | None, positions: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (B, T, R) of the tokens: where every row is at positions start, start + 1, ... (decoding
        without padding), a view of the tables' rows, no gather; else the rows of `positions` (B, T)."""
        if start is not None:
            cos_table, sin_table = self._rotary_tables(start + tokens)
            cos, sin = cos_table[None, start : start + tokens], sin_table[None, start : start + tokens]
            if batch > 1:
                cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
            return cos, sin
        assert positions is not None
        cos_table, sin_table = self._rotary_tables(int(positions.max()) + 1)
        return cos_table[positions], sin_table[positions]

    # ---- the model -------------------------------------------------------------------------------------

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty cache for `batch` rows of up to `capacity` tokens each."""
        c = self.cfg
        return KVCache.empty(c.layers, batch, c.kv_heads, capacity, c.head_dim, self.dtype)

    def new_slots(self, slots: int, capacity: int) -> SlotCache:
        """An empty cache for `slots` texts of up to `capacity` tokens each, at lengths of their own (a server's
        running requests)."""
        c = self.cfg
        return SlotCache.empty(c.layers, slots, c.kv_heads, capacity, c.head_dim, self.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,  # accepted for code that calls transformers models alike; see `cache`
        last_only: bool = False,
    ) -> CausalOutput:
        """Logits of `input_ids` (B, T). `attention_mask` (B, T) marks the real tokens of left-padded rows (only
        where the cache is empty). With `cache`, the tokens continue the cached ones and are cached in turn.
        `last_only`: logits of each row's last token only, (B, 1, V): all that decoding needs."""
        if input_ids.dim() != 2:
            raise SparseftError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
        batch, tokens = input_ids.shape
        start = positions = None
        if cache is not None:
            cache.begin(batch, tokens, attention_mask)
            start = cache.shared_position()
            if start is None:
                positions = cache.positions(tokens)
            mask = cache.masks(tokens)
        else:
            positions, mask = _positions_and_mask(attention_mask, batch, tokens)
        cos, sin = self._angles(batch, tokens, start, positions)
        h = functional.embedding(input_ids, self.embed)
        if tokens == 1 and start is not None and isinstance(cache, KVCache) and self._one_call(batch):
            isa = dispatch.LEVELS[dispatch.current_isa()]
            h = self._stack.step(h, cos, sin, cache.keys, cache.values, start, isa, self.stub_linears)
        elif tokens == 1 and isinstance(cache, SlotStep) and self._one_call(batch):
            # a server's running requests, each at its own length
            isa = dispatch.LEVELS[dispatch.current_isa()]
            slots, keys, values = cache.slots, cache.cache.keys, cache.cache.values
            lengths = [cache.cache.lengths[s] for s in slots]
            h = self._stack.step_rows(h, cos, sin, keys, values, slots, lengths, isa, self.stub_linears)
        else:
            for index, block in enumerate(self._layers):
                h = self._block(block, index, h, cos, sin, cache, mask)
        if cache is not None:
            cache.advance(tokens)
        if last_only:
            h = h[:, -1:]
        h = ops.rms_norm(h, self.norm, self.cfg.eps)
        return CausalOutput(self.head(h))

    def _one_call(self, batch: int) -> bool:
        """Whether this decoding step goes through every layer in one C++ call (models/step.py)."""
        return step.ready(self, batch, step.build, step.takes)

    def _block(
        self,
        block: Block,
        index: int,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: Cache | None,
        mask: Any,
    ) -> torch.Tensor:
        c = self.cfg
        batch, tokens, _ = h.shape
        x = ops.rms_norm(h, block.input_norm, c.eps)
        y = block.qkv(x)
        # q, k and v (B, heads, T, D) as views of the packed output: three calls rather than nine
        heads = y.view(batch, tokens, -1, c.head_dim).transpose(1, 2)
        q, k, v = heads.split_with_sizes((c.heads, c.kv_heads, c.kv_heads), 1)
        if block.q_norm is not None and block.k_norm is not None:
            q = ops.rms_norm(q, block.q_norm, c.eps)
            k = ops.rms_norm(k, block.k_norm, c.eps)
        q, k = ops.rotary(q, k, cos, sin)
        window = c.windows[index]
        if cache is None:
            seen = mask[window]
            a = ops.attention(q, k, v, self.scale, seen, causal=seen is None)
        else:
            a = cache.attend(index, q, k, v, self.scale, window, mask)
        h = h + block.o(a.reshape(batch, tokens, c.heads * c.head_dim))
        x = ops.rms_norm(h, block.post_norm, c.eps)
        return h + block.down(ops.silu_mul(block.gate_up(x)))

    # ---- decoding --------------------------------------------------------------------------------------

    def generate(self, input_ids: torch.Tensor, **options: Any) -> torch.Tensor:
        """See `sparseft.runtime.generate.generate`."""
        from sparseft.runtime.generate import generate

        return generate(self, input_ids, **options)


def _positions_and_mask(
    attention_mask: torch.Tensor | None, batch: int, tokens: int
) -> tuple[torch.Tensor, Any]:
    """Positions (B, T) and the masks of a forward without a cache."""
    steps = torch.arange(tokens)
    if attention_mask is None:
        positions = steps.expand(batch, tokens)
        real = None
    else:
        real = attention_mask.bool()
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def make(window: int | None) -> torch.Tensor | None:
        if real is None and window is None:
            return None
        seen = steps[None, :] <= steps[:, None]
        if window is not None:
            seen = seen & (steps[None, :] > steps[:, None] - window)
        seen = seen[None, None]
        if real is not None:
            # a padding query sees itself: a row that sees nothing would be NaN, and NaN times a zero weight
            # would still reach the real rows through the values
            seen = (seen & real[:, None, None, :]) | torch.eye(tokens, dtype=torch.bool)
        return seen.expand(batch, 1, tokens, tokens)

    return positions, Masks(make)


# ---- building from a checkpoint ------------------------------------------------------------------------


def _head(
    weights: CheckpointWeights,
    cfg: LlamaConfig,
    embed: torch.Tensor,
    dtype: torch.dtype,
    head_values: Values | None,
) -> nn.Module:
    tied = cfg.tie_embeddings or not weights.has("lm_head.weight")
    if tied:
        weight = embed
    elif (
        head_values == "int8"
    ):  # read, not mapped: a mapped page once touched stays resident beside the int8 copy
        weight = weights.reader.read("lm_head.weight")
    else:
        weight = weights.tensor("lm_head.weight", dtype)
    if tuple(weight.shape) != (cfg.vocab_size, cfg.hidden_size):
        raise SparseftError(
            f"lm_head.weight is {tuple(weight.shape)} in {weights.directory}, not {(cfg.vocab_size, cfg.hidden_size)}"
            "; export it again"
        )
    return lm_head(weight, dtype, head_values)


def build(
    weights: CheckpointWeights,
    hf_config: Any,
    values: Values,
    dtype: torch.dtype,
    head_values: Values | None = "bf16",
    generation_config: Any = None,
) -> LlamaDecoder:
    """The decoder of `hf_config` with the tensors of `weights`; NotCovered for a model it does not run."""
    cfg = llama_config(hf_config)
    prefix = "model.layers"
    blocks = []
    hidden, inner, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q_rows, kv_rows = cfg.heads * d, cfg.kv_heads * d
    for i in range(cfg.layers):
        attn, mlp = f"{prefix}.{i}.self_attn", f"{prefix}.{i}.mlp"
        if cfg.stacked:
            qkv = stacked_linear([weights.linear(f"{attn}.qkv_proj", values, (q_rows + 2 * kv_rows, hidden))])
            gate_up = stacked_linear([weights.linear(f"{mlp}.gate_up_proj", values, (2 * inner, hidden))])
        else:
            qkv = stacked_linear(
                [
                    weights.linear(f"{attn}.q_proj", values, (q_rows, hidden)),
                    weights.linear(f"{attn}.k_proj", values, (kv_rows, hidden)),
                    weights.linear(f"{attn}.v_proj", values, (kv_rows, hidden)),
                ]
            )
            gate_up = stacked_linear(
                [
                    weights.linear(f"{mlp}.gate_proj", values, (inner, hidden)),
                    weights.linear(f"{mlp}.up_proj", values, (inner, hidden)),
                ]
            )
        o = SparseLinear(*weights.linear(f"{attn}.o_proj", values, (hidden, q_rows)))
        down = SparseLinear(*weights.linear(f"{mlp}.down_proj", values, (hidden, inner)))
        norms = (
            weights.tensor(f"{prefix}.{i}.input_layernorm.weight", dtype),
            weights.tensor(f"{prefix}.{i}.post_attention_layernorm.weight", dtype),
        )
        head_norms = None
        if cfg.head_norms:
            head_norms = (
                weights.tensor(f"{attn}.q_norm.weight", dtype),
                weights.tensor(f"{attn}.k_norm.weight", dtype),
            )
        blocks.append(Block(qkv, o, gate_up, down, norms, head_norms))
        release_freed_memory()
    embed = weights.tensor("model.embed_tokens.weight", dtype)
    if tuple(embed.shape) != (cfg.vocab_size, hidden):
        raise SparseftError(
            f"model.embed_tokens.weight is {tuple(embed.shape)} in {weights.directory} but its config.json makes "
            f"it {(cfg.vocab_size, hidden)}; export it again"
        )
    norm = weights.tensor("model.norm.weight", dtype)
    head = _head(weights, cfg, embed, dtype, head_values)
    model = LlamaDecoder(cfg, hf_config, embed, blocks, norm, head, generation_config)
    release_freed_memory()
    return model.eval()
