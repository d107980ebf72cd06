"""The runtime's own Whisper: the encoder (convolution stem, sinusoidal positions, pre-norm blocks) runs once per
clip; the decoder keeps its self-attention keys and values in a static cache and the encoder's keys and values of
every cross-attention, computed once, beside them.

The operations follow transformers' Whisper as the tests compare them: the query is scaled before attention (not
inside it), LayerNorms with eps 1e-5, exact GELU, learned decoder positions, the output projection tied to the
token embeddings. `generate` starts from the generation config's decoder prompt (start token, language and task
tokens where the model is multilingual, no-timestamps token), suppresses the tokens the config lists, and decodes
greedily, by sampling, or by beam search as transformers' Whisper does for one 30 s window (`beam.py`): the
beams of a clip are rows of the self-attention cache, reordered in place each step, and share the clip's
cross-attention keys and values.
"""

from __future__ import annotations

from collections.abc import Callable
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
from sparseft.runtime.models.beam import BeamSettings, beam_search
from sparseft.runtime.models.cache import KVCache
from sparseft.runtime.models.llama import CausalOutput, NotCovered
from sparseft.runtime.packing import Values
from sparseft.runtime.weights import CheckpointWeights, lm_head, stacked_linear

EPS = 1e-5  # nn.LayerNorm's default, which transformers' Whisper keeps


@dataclass(frozen=True)
class WhisperConfig:
    width: int
    heads: int
    encoder_layers: int
    decoder_layers: int
    encoder_ffn: int
    decoder_ffn: int
    vocab_size: int
    mel_bins: int
    source_positions: int
    target_positions: int

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


def whisper_config(hf: Any) -> WhisperConfig:
    if hf.model_type != "whisper":
        raise NotCovered(f"{hf.model_type} has no own decoder", listed=False)
    if hf.activation_function != "gelu":
        raise NotCovered(f"its activation {hf.activation_function!r} is not covered")
    if hf.encoder_attention_heads != hf.decoder_attention_heads:
        raise NotCovered("encoder and decoder head counts that differ are not covered")
    return WhisperConfig(
        width=hf.d_model,
        heads=hf.decoder_attention_heads,
        encoder_layers=hf.encoder_layers,
        decoder_layers=hf.decoder_layers,
        encoder_ffn=hf.encoder_ffn_dim,
        decoder_ffn=hf.decoder_ffn_dim,
        vocab_size=hf.vocab_size,
        mel_bins=hf.num_mel_bins,
        source_positions=hf.max_source_positions,
        target_positions=hf.max_target_positions,
    )


def _norm(x: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return functional.layer_norm(x, (x.shape[-1],), norm[0], norm[1], EPS)


class Block(nn.Module):
    """One encoder or decoder layer: self-attention (q/k/v stacked), cross-attention for the decoder (its query,
    and its k/v stacked, which read the encoder's output), the MLP, and the LayerNorms as (weight, bias)."""

    def __init__(
        self,
        qkv: SparseLinear,
        out: SparseLinear,
        fc1: SparseLinear,
        fc2: SparseLinear,
        norms: list[tuple[torch.Tensor, torch.Tensor]],
        cross: tuple[SparseLinear, SparseLinear, SparseLinear] | None = None,
    ) -> None:
        super().__init__()
        self.qkv, self.out, self.fc1, self.fc2 = qkv, out, fc1, fc2
        self.norms = norms
        self.cross_q = self.cross_kv = self.cross_out = None
        if cross is not None:
            self.cross_q, self.cross_kv, self.cross_out = cross


@dataclass(eq=False)
class WhisperCache:
    """The decoder's self-attention cache and, per layer, the encoder's keys and values (B, H, S, D). With
    `beams` > 1 the self-attention cache holds B x beams rows (row b beams + j: beam j of clip b) and each
    clip's keys and values are read by all its beams."""

    self_attention: KVCache
    cross: list[tuple[torch.Tensor, torch.Tensor]]
    beams: int = 1

    @property
    def length(self) -> int:
        return self.self_attention.length

    @length.setter
    def length(self, value: int) -> None:
        self.self_attention.length = value

    @property
    def starts(self) -> list[int]:
        return self.self_attention.starts

    def begin(self, batch: int, tokens: int, attention_mask: torch.Tensor | None) -> None:
        self.self_attention.begin(batch, tokens, attention_mask)

    def row(self, row: int) -> WhisperCache:
        """Row `row` as a cache of its own over the same buffers (see KVCache.row)."""
        if self.beams != 1:
            raise SparseftError("a beam search cache has no rows of its own; use first_beams")
        cross = [(k[row : row + 1], v[row : row + 1]) for k, v in self.cross]
        return WhisperCache(self.self_attention.row(row), cross)

    def first_beams(self) -> WhisperCache:
        """Beam 0 of every clip as a cache over the same buffers: the prompt is decoded once per clip, then
        copied to the other beams (`reorder`)."""
        own, step = self.self_attention, self.beams
        keys, values = [k[::step] for k in own.keys], [v[::step] for v in own.values]
        return WhisperCache(KVCache(keys, values, [0] * len(keys[0]), own.length), self.cross)

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i of the self-attention cache takes what row `rows[i]` held (beam search), in place in the static
        buffers; the encoder's keys and values belong to the clip, not the beam, and stay."""
        if torch.equal(rows, torch.arange(len(rows))):
            return
        end = self.length
        for buffer in (*self.self_attention.keys, *self.self_attention.values):
            buffer[:, :, :end] = buffer[:, :, :end].index_select(0, rows)


class WhisperModel(nn.Module):
    """Whisper on the sparse runtime: `encode`, a decoder `forward` over a `WhisperCache`, and `generate`."""

    decoder_name = "sparseft whisper"
    eps = EPS
    # A decoding step goes through the decoder's layers in one C++ call where it can (models/step.py); False: the
    # Python code always (the same bits, slower).
    one_call_steps = True
    # For measurement only: every linear of a one-call step gives zeros.
    stub_linears = False
    _encoder: list[Block]
    _decoder: list[Block]
    conv1_weight: torch.Tensor
    conv1_bias: torch.Tensor
    conv2_weight: torch.Tensor
    conv2_bias: torch.Tensor
    encoder_positions: torch.Tensor
    encoder_norm_weight: torch.Tensor
    encoder_norm_bias: torch.Tensor
    embed_tokens: torch.Tensor
    decoder_positions: torch.Tensor
    decoder_norm_weight: torch.Tensor
    decoder_norm_bias: torch.Tensor

    def __init__(
        self,
        config: WhisperConfig,
        hf_config: Any,
        tensors: dict[str, torch.Tensor],
        encoder: list[Block],
        decoder: list[Block],
        head: nn.Module,
        generation_config: Any = None,
    ) -> None:
        super().__init__()
        self.cfg = config
        self.config = hf_config
        self.generation_config = generation_config
        for name, tensor in tensors.items():  # stem, positions, embeddings, final norms
            setattr(self, name, nn.Parameter(tensor, requires_grad=False))
        self.encoder_blocks = nn.ModuleList(encoder)
        self.decoder_blocks = nn.ModuleList(decoder)
        self._encoder, self._decoder = list(encoder), list(decoder)
        self.head = head
        self.scale = config.head_dim**-0.5
        self.value_kinds = {b.qkv.kind for b in decoder}
        # the C++ decoding step (models/step.py), built on first use; False: not this model
        self._stack: Any = None

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    def _apply(self, fn: Any, recurse: bool = True) -> WhisperModel:
        self._stack = None  # moved or cast: the step holds the old tensors
        return super()._apply(fn, recurse)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        return x.view(batch, tokens, self.cfg.heads, self.cfg.head_dim).transpose(1, 2)

    def _self_attention(self, block: Block, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        w = self.cfg.width
        y = block.qkv(x)
        # as transformers: the query scaled before attention, and attention itself unscaled
        q = self._split_heads(y[..., :w] * self.scale)
        return q, self._split_heads(y[..., w : 2 * w]), self._split_heads(y[..., 2 * w :])

    def _mlp(self, block: Block, h: torch.Tensor) -> torch.Tensor:
        return h + block.fc2(functional.gelu(block.fc1(_norm(h, block.norms[-1]))))

    @torch.inference_mode()
    def encode(self, input_features: torch.Tensor) -> torch.Tensor:
        """The encoder's output (B, S, width) for log-mel features (B, mel bins, 2 S)."""
        expected = (self.cfg.mel_bins, 2 * self.cfg.source_positions)
        if input_features.dim() != 3 or tuple(input_features.shape[1:]) != expected:
            raise SparseftError(
                f"input_features must be (batch, {expected[0]}, {expected[1]}), got {tuple(input_features.shape)}; "
                "use the model's feature extractor (30 s windows)"
            )
        x = input_features.to(self.dtype)
        x = functional.gelu(functional.conv1d(x, self.conv1_weight, self.conv1_bias, padding=1))
        x = functional.gelu(functional.conv1d(x, self.conv2_weight, self.conv2_bias, stride=2, padding=1))
        h = x.permute(0, 2, 1) + self.encoder_positions
        batch, tokens, _ = h.shape
        for block in self._encoder:
            q, k, v = self._self_attention(block, _norm(h, block.norms[0]))
            a = ops.attention(q, k, v, 1.0)
            h = h + block.out(a.reshape(batch, tokens, self.cfg.width))
            h = self._mlp(block, h)
        return _norm(h, (self.encoder_norm_weight, self.encoder_norm_bias))

    def get_encoder(self) -> Any:
        """`encode`, under the name transformers' encoder-decoders give it (`runtime.bench` times it so)."""
        return self.encode

    def new_cache(self, batch: int, capacity: int, encoded: torch.Tensor, beams: int = 1) -> WhisperCache:
        """A cache for `batch` clips (`beams` rows each) of up to `capacity` decoder tokens, holding the
        cross-attention keys and values of the encoder's output `encoded` (batch, S, width)."""
        if capacity > self.cfg.target_positions:
            raise SparseftError(
                f"Whisper decodes at most {self.cfg.target_positions} tokens (max_target_positions), asked for "
                f"{capacity}; ask for fewer new tokens"
            )
        c = self.cfg
        cross = []
        with torch.inference_mode():
            for block in self._decoder:
                assert block.cross_kv is not None
                kv = block.cross_kv(encoded)
                # contiguous once here, not copied by the attention at every step (1500 positions a layer)
                keys, values = (self._split_heads(kv[..., i * c.width : (i + 1) * c.width]) for i in range(2))
                cross.append((keys.contiguous(), values.contiguous()))
        own = KVCache.empty(c.decoder_layers, batch * beams, c.heads, capacity, c.head_dim, self.dtype)
        return WhisperCache(own, cross, beams)

    def forward(
        self, decoder_input_ids: torch.Tensor, cache: WhisperCache, last_only: bool = False
    ) -> CausalOutput:
        """Logits of the decoder tokens `decoder_input_ids` (B, T) after those already in `cache`."""
        batch, tokens = decoder_input_ids.shape
        own = cache.self_attention
        own.begin(batch, tokens, None)
        start = own.length
        h = (
            functional.embedding(decoder_input_ids, self.embed_tokens)
            + self.decoder_positions[start : start + tokens]
        )
        if tokens == 1 and cache.beams == 1 and self._one_call(batch):
            h = self._stack.step(
                h,
                own.keys,
                own.values,
                [keys for keys, _ in cache.cross],
                [values for _, values in cache.cross],
                start,
                dispatch.LEVELS[dispatch.current_isa()],
                self.stub_linears,
            )
            own.length += tokens
            return self._logits(h, last_only)
        masks = own.masks(tokens)
        for index, block in enumerate(self._decoder):
            q, k, v = self._self_attention(block, _norm(h, block.norms[0]))
            keys, values = own.store(index, k, v)
            if tokens == 1 and ops.op_attends(q):
                a = ops.decode_attention(q, keys, values, 1.0)
            else:
                a = ops.attention(q, keys, values, 1.0, None if tokens == 1 else masks[None])
            h = h + block.out(a.reshape(batch, tokens, self.cfg.width))
            h = self._cross_attention(block, h, *cache.cross[index], cache.beams)
            h = self._mlp(block, h)
        own.length += tokens
        return self._logits(h, last_only)

    def _logits(self, h: torch.Tensor, last_only: bool) -> CausalOutput:
        if last_only:
            h = h[:, -1:]
        return CausalOutput(self.head(_norm(h, (self.decoder_norm_weight, self.decoder_norm_bias))))

    def _one_call(self, batch: int) -> bool:
        """Whether this decoding step goes through every decoder layer in one C++ call (models/step.py)."""
        return step.ready(self, batch, step.whisper_build, step.whisper_takes)

    def _cross_attention(
        self, block: Block, h: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, beams: int = 1
    ) -> torch.Tensor:
        assert block.cross_q is not None and block.cross_out is not None
        batch, tokens, _ = h.shape
        q = self._split_heads(block.cross_q(_norm(h, block.norms[1])) * self.scale)
        if beams > 1:
            # The beams of a clip read the same encoder keys: their queries go in as more queries of the clip's
            # row (B, H, beams x T, D), so the keys are neither copied nor read once per beam.
            clips, d = batch // beams, self.cfg.head_dim
            q = q.view(clips, beams, self.cfg.heads, tokens, d).transpose(1, 2)
            a = ops.attention(q.reshape(clips, self.cfg.heads, beams * tokens, d), keys, values, 1.0)
        elif tokens == 1 and ops.op_attends(q):
            a = ops.decode_attention(q, keys, values, 1.0)
        else:
            a = ops.attention(q, keys, values, 1.0)
        return h + block.cross_out(a.reshape(batch, tokens, self.cfg.width))

    # ---- generation -----------------------------------------------------------------------------------

    def prompt(self, language: str | None = None, task: str | None = None) -> list[int]:
        """The decoder's first tokens: the start token, then (multilingual models) language and task, then the
        no-timestamps token where the model has one."""
        g = self.generation_config
        tokens = [int(g.decoder_start_token_id)]
        lang_to_id = getattr(g, "lang_to_id", None) or {}
        task_to_id = getattr(g, "task_to_id", None) or {}
        if language is not None:
            key = language if language.startswith("<|") else f"<|{language}|>"
            if key not in lang_to_id:
                raise SparseftError(
                    f"this Whisper has no language {language!r}; it knows {sorted(lang_to_id)[:8]}..."
                )
            tokens.append(int(lang_to_id[key]))
        if task_to_id and (task or language is not None):
            if (task or "transcribe") not in task_to_id:
                raise SparseftError(f"task must be one of {sorted(task_to_id)}, got {task!r}")
            tokens.append(int(task_to_id[task or "transcribe"]))
        no_timestamps = getattr(g, "no_timestamps_token_id", None)
        if no_timestamps is not None:
            tokens.append(int(no_timestamps))
        return tokens

    @torch.inference_mode()
    def generate(
        self,
        input_features: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        language: str | None = None,
        task: str | None = None,
        num_beams: int | None = None,
        encoded: torch.Tensor | None = None,
        *,
        min_new_tokens: int = 0,
        length_penalty: float | None = None,
        early_stopping: bool | str | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """Transcription of `input_features`: (B, prompt + new tokens), the decoder prompt first (see `prompt`),
        an ended row's end token then `pad_token_id`. `encoded`: the clips' encoder output (`encode`) when the
        caller has it already.

        Greedy (or sampled: `do_sample` and the other options of `sparseft.runtime.generate.generate`) with
        `num_beams` 1, else beam search as transformers' Whisper `generate(num_beams=N)` does it (`models/beam.py`).
        `num_beams`, `length_penalty` and `early_stopping` default to the generation config's, else to
        transformers' defaults (1, 1.0, False). No end token is chosen before `min_new_tokens` new tokens."""
        from sparseft.runtime.generate import end_ids, generate

        g = self.generation_config
        beams = int(_setting(g, "num_beams", num_beams, 1))
        if beams < 1 or min_new_tokens < 0:
            raise SparseftError(
                f"num_beams must be 1 or more and min_new_tokens 0 or more, got {beams}, {min_new_tokens}"
            )
        if encoded is None:
            if input_features is None:
                raise SparseftError("generate needs input_features (or their encoder output, encoded=)")
            encoded = self.encode(input_features)
        prompt = torch.tensor([self.prompt(language, task)] * encoded.shape[0])
        ends = end_ids(self, options.get("eos_token_id"))
        suppressed = self._suppressed(ends, min_new_tokens)
        options.setdefault("pad_token_id", getattr(g, "pad_token_id", None))
        if beams == 1:
            bound = _Bound(self, encoded)
            return generate(bound, prompt, max_new_tokens=max_new_tokens, logits_filter=suppressed, **options)
        if max_new_tokens == 0:
            return prompt
        unused = set(options) - {"eos_token_id", "pad_token_id", "do_sample"}
        if options.get("do_sample") or unused:
            given = sorted(unused) or ["do_sample=True"]
            raise SparseftError(f"beam search takes no {', '.join(given)}; use num_beams=1 for those")
        settings = BeamSettings(
            beams,
            max_new_tokens,
            frozenset(ends),
            float(_setting(g, "length_penalty", length_penalty, 1.0)),
            _setting(g, "early_stopping", early_stopping, False),
        )
        pad = options["pad_token_id"]
        return self._beam_search(
            encoded, prompt, settings, suppressed, min(ends, default=0) if pad is None else pad
        )

    def _suppressed(self, ends: set[int], min_new_tokens: int) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """The logits filter of each step: the generation config's suppressed tokens, its begin-suppressed ones at
        the first new token, and the end tokens before `min_new_tokens` (transformers' Whisper logits processors
        and MinNewTokensLengthLogitsProcessor)."""
        g = self.generation_config
        suppress = torch.tensor(list(getattr(g, "suppress_tokens", None) or []), dtype=torch.long)
        at_begin = torch.tensor(list(getattr(g, "begin_suppress_tokens", None) or []), dtype=torch.long)
        end_tokens = torch.tensor(sorted(ends), dtype=torch.long)

        def suppressed(step: int, logits: torch.Tensor) -> torch.Tensor:
            hidden = [suppress]
            if step == 0:
                hidden.append(at_begin)
            if step < min_new_tokens:
                hidden.append(end_tokens)
            tokens = torch.cat(hidden)
            return logits.index_fill(-1, tokens, float("-inf")) if tokens.numel() else logits

        return suppressed

    def _beam_search(
        self,
        encoded: torch.Tensor,
        prompt: torch.Tensor,
        settings: BeamSettings,
        suppressed: Callable[[int, torch.Tensor], torch.Tensor],
        pad: int,
    ) -> torch.Tensor:
        """`prompt` then each clip's best hypothesis, padded on the right with `pad`."""
        clips, prompt_length = prompt.shape
        beams = settings.num_beams
        cache = self.new_cache(clips, prompt_length + settings.max_new_tokens, encoded, beams)
        first = self(prompt, cache.first_beams(), last_only=True).logits[:, -1]
        cache.length = prompt_length
        cache.reorder(torch.arange(clips).repeat_interleave(beams) * beams)  # beam 0's prompt to every beam

        def step(rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            cache.reorder(rows)
            return self(tokens[:, None], cache, last_only=True).logits[:, -1]

        best = beam_search(first, step, settings, suppressed)
        out = torch.full((clips, prompt_length + max(len(b) for b in best)), pad, dtype=torch.long)
        out[:, :prompt_length] = prompt
        for row, tokens in enumerate(best):
            out[row, prompt_length : prompt_length + len(tokens)] = tokens
        return out


def _setting(generation_config: Any, name: str, given: Any, default: Any) -> Any:
    """`given`, else the generation config's `name`, else transformers' default for it (a config leaves unset
    values None)."""
    if given is not None:
        return given
    stored = getattr(generation_config, name, None)
    return default if stored is None else stored


class _Bound:
    """The decoder bound to one clip's encoder output, in the shape `runtime.generate` drives."""

    def __init__(self, model: WhisperModel, encoded: torch.Tensor) -> None:
        self.model, self.encoded = model, encoded
        self.generation_config = model.generation_config
        self.config = model.config

    def new_cache(self, batch: int, capacity: int) -> WhisperCache:
        return self.model.new_cache(batch, capacity, self.encoded)

    def __call__(
        self, ids: torch.Tensor, attention_mask: Any = None, cache: Any = None, last_only: bool = False
    ) -> CausalOutput:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise SparseftError("Whisper's decoder prompts are not padded")
        return self.model(ids, cache, last_only)


# ---- building from a checkpoint ------------------------------------------------------------------------


def _block(
    weights: CheckpointWeights,
    prefix: str,
    values: Values,
    dtype: torch.dtype,
    width: int,
    ffn: int,
    cross: bool,
) -> Block:
    def attention(name: str) -> list[Any]:
        return [weights.linear(f"{prefix}.{name}.{p}_proj", values, (width, width)) for p in ("q", "k", "v")]

    def norm(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return weights.tensor(f"{prefix}.{name}.weight", dtype), weights.tensor(
            f"{prefix}.{name}.bias", dtype
        )

    names = ["self_attn_layer_norm", *(["encoder_attn_layer_norm"] if cross else []), "final_layer_norm"]
    cross_linears = None
    if cross:
        q, k, v = attention("encoder_attn")
        out = weights.linear(f"{prefix}.encoder_attn.out_proj", values, (width, width))
        cross_linears = (SparseLinear(*q), stacked_linear([k, v]), SparseLinear(*out))
    return Block(
        stacked_linear(attention("self_attn")),
        SparseLinear(*weights.linear(f"{prefix}.self_attn.out_proj", values, (width, width))),
        SparseLinear(*weights.linear(f"{prefix}.fc1", values, (ffn, width))),
        SparseLinear(*weights.linear(f"{prefix}.fc2", values, (width, ffn))),
        [norm(n) for n in names],
        cross_linears,
    )


def build(
    weights: CheckpointWeights,
    hf_config: Any,
    values: Values,
    dtype: torch.dtype,
    head_values: Values | None = "bf16",
    generation_config: Any = None,
) -> WhisperModel:
    """Whisper from the tensors of `weights`; NotCovered for a model it does not run."""
    cfg = whisper_config(hf_config)
    w = cfg.width
    encoder = [
        _block(weights, f"model.encoder.layers.{i}", values, dtype, w, cfg.encoder_ffn, cross=False)
        for i in range(cfg.encoder_layers)
    ]
    release_freed_memory()
    decoder = [
        _block(weights, f"model.decoder.layers.{i}", values, dtype, w, cfg.decoder_ffn, cross=True)
        for i in range(cfg.decoder_layers)
    ]
    names = {
        "conv1_weight": "model.encoder.conv1.weight",
        "conv1_bias": "model.encoder.conv1.bias",
        "conv2_weight": "model.encoder.conv2.weight",
        "conv2_bias": "model.encoder.conv2.bias",
        "encoder_positions": "model.encoder.embed_positions.weight",
        "encoder_norm_weight": "model.encoder.layer_norm.weight",
        "encoder_norm_bias": "model.encoder.layer_norm.bias",
        "embed_tokens": "model.decoder.embed_tokens.weight",
        "decoder_positions": "model.decoder.embed_positions.weight",
        "decoder_norm_weight": "model.decoder.layer_norm.weight",
        "decoder_norm_bias": "model.decoder.layer_norm.bias",
    }
    tensors = {attr: weights.tensor(name, dtype) for attr, name in names.items()}
    if tuple(tensors["embed_tokens"].shape) != (cfg.vocab_size, w):
        raise SparseftError(
            f"model.decoder.embed_tokens.weight is {tuple(tensors['embed_tokens'].shape)} in {weights.directory}, "
            f"not {(cfg.vocab_size, w)}; export it again"
        )
    tied = not weights.has("proj_out.weight")
    head = lm_head(
        tensors["embed_tokens"] if tied else weights.tensor("proj_out.weight", dtype), dtype, head_values
    )
    model = WhisperModel(cfg, hf_config, tensors, encoder, decoder, head, generation_config)
    release_freed_memory()
    return model.eval()
