"""The Python API: one function per verb. The CLI calls these and only parses and prints.

    sparseft.prune(model, output, method=..., sparsity=...)   one-shot pruning to a HF checkpoint
    sparseft.api.eval_ppl(model, dataset=..., seqlen=...)     perplexity with its protocol recorded
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from sparseft.atomic import atomic_dir, write_json
from sparseft.data import TextSource, calibration_samples, load_texts, token_stream
from sparseft.errors import SparseftError
from sparseft.evaluate import perplexity
from sparseft.models import find_targets, layer_sparsity, load_model, load_tokenizer, max_positions, weight_matrix
from sparseft.pruning.sequential import prune_model
from sparseft.recipe import PruneConfig, prune_config


def _check_seqlen(model: torch.nn.Module, seqlen: int) -> None:
    limit = max_positions(model.config)
    if limit is not None and seqlen > limit:
        raise SparseftError(f"seqlen {seqlen} is longer than the model allows ({limit}); use --seqlen {limit}")


def _check_output(output: str | Path, overwrite: bool) -> None:
    path = Path(output)
    if path.exists() and (not path.is_dir() or not overwrite):
        raise SparseftError(f"output {path} already exists; remove it, choose another --output, or pass --overwrite")


def prune(
    model: str,
    output: str | Path,
    config: PruneConfig | None = None,
    *,
    recipe: str | Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **settings: Any,
) -> dict[str, Any]:
    """Prune `model` (hub id or directory) one-shot and save a HF checkpoint with zeros kept to `output`.

    Settings are the fields of `PruneConfig` (method, sparsity, structure, targets, ignore, dataset, ...), given
    as a config, a YAML recipe, keyword arguments, or a mix (keywords win). Returns the report that is also
    written to `output/sparsity.json`.
    """
    cfg = config.model_copy(update=settings) if config is not None else prune_config(recipe, **settings)
    cfg = PruneConfig.model_validate(cfg.model_dump())
    _check_output(output, overwrite)
    if cfg.method != "magnitude" and cfg.dataset is None:
        raise SparseftError(f"{cfg.method} needs calibration data: pass --dataset (a local file or a datasets name)")
    started = time.perf_counter()
    tokenizer = load_tokenizer(model, trust_remote_code)
    net = load_model(model, dtype, trust_remote_code)
    settings_ = cfg.settings()
    targets = find_targets(net, cfg.targets or None, cfg.ignore)
    if settings_.structure is not None:
        for name, module in targets.items():
            settings_.structure.check_columns(weight_matrix(module).shape[1], name)
    samples = None
    source = None
    if cfg.method != "magnitude":
        assert cfg.dataset is not None
        _check_seqlen(net, cfg.seqlen)
        source = TextSource(cfg.dataset, cfg.dataset_config, cfg.split, cfg.text_field)
        samples = calibration_samples(tokenizer, source, cfg.num_samples, cfg.seqlen, cfg.seed)

    prune_model(net, targets, settings_, samples, device=device, progress=progress)

    layers = {name: {"shape": list(weight_matrix(m).shape), "sparsity": layer_sparsity(m)} for name, m in targets.items()}
    zeros = sum(v["sparsity"] * v["shape"][0] * v["shape"][1] for v in layers.values())
    numel = sum(v["shape"][0] * v["shape"][1] for v in layers.values())
    report = {
        "model": model,
        "method": cfg.method,
        "sparsity": settings_.sparsity,
        "structure": str(settings_.structure) if settings_.structure else "unstructured",
        "calibration": None
        if source is None
        else {**source.describe(), "num_samples": cfg.num_samples, "seqlen": cfg.seqlen, "seed": cfg.seed},
        "targets_sparsity": zeros / numel,
        "seconds": round(time.perf_counter() - started, 2),
        "layers": layers,
    }
    with atomic_dir(output) as tmp:
        net.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "sparsity.json", report)
    return report


def eval_ppl(
    model: str,
    dataset: str,
    dataset_config: str | None = None,
    split: str = "test",
    text_field: str = "text",
    seqlen: int = 2048,
    batch_size: int = 1,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of `model` on a dataset split, with the protocol recorded beside the figure."""
    if seqlen < 2:
        raise SparseftError(f"seqlen must be at least 2, got {seqlen}")
    tokenizer = load_tokenizer(model, trust_remote_code)
    net = load_model(model, dtype, trust_remote_code).to(device)
    _check_seqlen(net, seqlen)
    source = TextSource(dataset, dataset_config, split, text_field)
    stream = token_stream(tokenizer, load_texts(source))
    result = perplexity(net, stream, seqlen, batch_size, progress)
    return {"task": "ppl", "model": model, **result, **source.describe(), "seqlen": seqlen,
            "protocol": "joined with blank lines, non-overlapping windows, exp(mean NLL)"}
