"""Model plumbing shared by every verb: loading, finding the transformer blocks, and finding pruning targets.

Blocks are found by shape, not by a table of names per architecture: a transformer stack is a `ModuleList` of
same-class modules that contain linear layers. This finds `model.layers` (Llama, Mistral, Qwen2), `h` (GPT-2),
`decoder.layers` (OPT), `blocks` (MPT), `layers` (GPT-NeoX), and the encoder and decoder stacks of T5 and Whisper.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from torch import nn

from sparseft.errors import SparseftError, first_line

try:  # GPT-2 style models store linear layers as Conv1D with a transposed weight.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers always has it today
    Conv1D = None  # type: ignore[assignment,misc]

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise SparseftError(f"unknown dtype {name!r}; use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def _check_source(name_or_path: str) -> None:
    path = Path(name_or_path)
    looks_local = name_or_path.startswith((".", "/", "~")) or path.exists() or name_or_path.count("/") > 1
    if looks_local:
        if not path.expanduser().exists():
            raise SparseftError(
                f"model path {name_or_path} does not exist; pass a local directory or a hub id"
            )
        if not (path.expanduser() / "config.json").exists():
            raise SparseftError(f"{name_or_path} has no config.json; pass a Hugging Face model directory")


def model_kind(config: Any) -> Literal["causal", "translation", "speech"]:
    """ "speech" for speech encoder-decoders (Whisper), "translation" for text ones (T5), else "causal"."""
    if not getattr(config, "is_encoder_decoder", False):
        return "causal"
    # Imported on first use: transformers' tables of auto classes make `import sparseft.hf` (and with it the
    # runtime and the server) noticeably slower to start, and only encoder-decoders get this far.
    from transformers.models.auto.modeling_auto import MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES

    return "speech" if config.model_type in MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES else "translation"


def read_config(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """The transformers config of a hub id or an HF directory (`sparseft.formats.load.load_config` also reads
    the config of a bitmask archive)."""
    try:
        return transformers.AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise SparseftError(f"cannot read the config of {name_or_path}: {first_line(e)}") from e


def model_class(config: Any) -> Any:
    """The transformers Auto class that loads a model of `config` (for `load_model`)."""
    return {
        "causal": transformers.AutoModelForCausalLM,
        "translation": transformers.AutoModelForSeq2SeqLM,
        "speech": transformers.AutoModelForSpeechSeq2Seq,
    }[model_kind(config)]


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    auto_class: Any = None,
) -> Any:
    """Load a Hugging Face model from a local directory or hub id, weights from safetensors only."""

    _check_source(name_or_path)
    if auto_class is None:  # the class follows the config: causal LM, T5-style seq2seq, or speech seq2seq
        auto_class = model_class(read_config(name_or_path, trust_remote_code))
    try:
        model = auto_class.from_pretrained(
            name_or_path,
            dtype=parse_dtype(dtype),
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )
    except (OSError, ValueError, ImportError) as e:  # ImportError: a quantization method's package is missing
        first = first_line(e)
        raise SparseftError(f"cannot load model {name_or_path}: {first}") from e
    model.eval()
    return model


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> Any:
    _check_source(name_or_path)
    # From a directory with no tokenizer files of its own, transformers may build an empty stand-in from the
    # config alone (GPT-2, T5) rather than fail.
    if Path(name_or_path).is_dir() and not any((Path(name_or_path) / f).exists() for f in TOKENIZER_FILES):
        raise SparseftError(
            f"{name_or_path} has no tokenizer: save one beside the model (tokenizer.save_pretrained)"
        )
    try:
        tok = transformers.AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise SparseftError(
            f"cannot load a tokenizer from {name_or_path}: save one beside the model (tokenizer.save_pretrained)"
        ) from e
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def max_positions(config: Any) -> int | None:
    """The longest sequence the model's position scheme supports, or None when it has no fixed limit."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "max_target_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D))


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), a view that shares storage with the module."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight.data.t() if Conv1D is not None and isinstance(module, Conv1D) else weight.data


def find_block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every top-level stack of transformer blocks, in registration order (encoder before decoder)."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue
        kinds = {type(child) for child in module}
        if len(kinds) == 1 and any(is_linear(m) for m in module[0].modules()):
            found.append((name, module))
    if not found:
        raise SparseftError(
            f"cannot find transformer blocks in {type(model).__name__}: no ModuleList of identical blocks "
            "containing linear layers"
        )
    return found


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-only stack: the largest block list by parameter count."""
    lists = find_block_lists(model)
    return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def _matches(pattern: str, name: str, module: nn.Module) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern) or type(module).__name__ == pattern


def _check_patterns(patterns: list[str], model: nn.Module, what: str) -> None:
    """Every pattern compiles and matches some linear layer (a misspelt --ignore would prune what it meant to
    keep)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as e:
                raise SparseftError(f"{what} {pattern!r} is not a valid regular expression: {e}") from None
        if not any(_matches(pattern, n, m) for n, m in model.named_modules() if is_linear(m)):
            raise SparseftError(
                f"{what} {pattern!r} matches no linear layer; check the names with `print(model)`"
            )


def find_targets(
    model: nn.Module,
    targets: list[str] | None = None,
    ignore: list[str] | None = None,
    within: list[str] | None = None,
) -> dict[str, nn.Module]:
    """Linear modules to prune, by full name.

    `targets`/`ignore` hold module names (a name matches itself and any module whose name ends in `.name`),
    class names, or `re:` regular expressions matched from the start of the full module name. With no
    `targets`, every linear inside the transformer blocks (`within`, default: all block lists) is a target.
    """
    ignore = ignore or []
    _check_patterns(targets or [], model, "target")
    _check_patterns(ignore, model, "ignore")
    if within is None and not targets:  # named targets need no blocks: any module will do
        within = [name for name, _ in find_block_lists(model)]
    chosen: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not is_linear(module):
            continue
        if targets:
            wanted = any(_matches(p, name, module) for p in targets)
        else:
            wanted = any(name.startswith(prefix + ".") for prefix in within or [])
        if wanted and not any(_matches(p, name, module) for p in ignore):
            chosen[name] = module
    embeddings = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    for name, module in chosen.items():
        if any(getattr(module, "weight", None) is e for e in embeddings):
            raise SparseftError(
                f"{name} shares its weight with the token embeddings (tied), which stay dense: --ignore {name}"
            )
    if not chosen:
        raise SparseftError(
            f"no linear layer matches targets={targets or 'default'} ignore={ignore}; "
            "check the module names with `print(model)`"
        )
    return chosen


def fused_weights(model: nn.Module) -> dict[str, int]:
    """Weights inside the transformer blocks that hold several matrices in one tensor of 3 or more dimensions (a
    mixture of experts' experts, as transformers 5 stores Mixtral's and Qwen-MoE's), by name, with their element
    counts. Pruning, export and the runtime take linear layers only, so these stay dense."""
    blocks = [name for name, _ in find_block_lists(model)]
    return {
        name: parameter.numel()
        for name, parameter in model.named_parameters()
        if parameter.dim() >= 3 and any(name.startswith(prefix + ".") for prefix in blocks)
    }


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` in the place of `model`'s submodule called `name`, in that submodule's training mode."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module.train(getattr(parent, child).training))


def layer_sparsity(module: nn.Module) -> float:
    weight = weight_matrix(module)
    return float((weight == 0).sum().item()) / weight.numel()
