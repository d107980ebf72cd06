"""The Python API: one function per verb. The CLI calls these and only parses and prints.

sparseft.prune(model, output, method=..., sparsity=...)   one-shot pruning, in memory or to a HF checkpoint
sparseft.api.eval_ppl(model, dataset=..., seqlen=...)     perplexity with its protocol recorded
sparseft.evaluate(model, task="gsm8k", dataset=...)       accuracy, perplexity or lm-eval tasks, as JSON
sparseft.finetune(model, output, teacher=..., dataset=...) sparse fine-tuning with distillation
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import TextStreamer

from sparseft import formats, modelcard
from sparseft import runtime as sparse_runtime
from sparseft.data import mathtask, seq2seq
from sparseft.data.batch import encoder_batches, task_calibration
from sparseft.data.records import check_local, load_records
from sparseft.data.text import TextSource, calibration_samples, load_texts, token_stream
from sparseft.errors import SparseftError, SparseftWarning
from sparseft.eval import lmeval
from sparseft.eval.gsm8k import gsm8k_accuracy
from sparseft.eval.perplexity import perplexity
from sparseft.eval.seq2seq import Seq2SeqEvalConfig, bleu, seq2seq_generate, wer
from sparseft.finetuning.config import finetune_config
from sparseft.finetuning.stages import run_finetune
from sparseft.formats.config import ExportConfig
from sparseft.hf import (
    find_targets,
    fused_weights,
    layer_sparsity,
    load_model,
    load_tokenizer,
    max_positions,
    model_kind,
    parse_dtype,
    weight_matrix,
)
from sparseft.io import atomic_dir, check_json_target, write_json
from sparseft.pruning.config import PruneConfig, prune_config
from sparseft.pruning.sequential import prune_model
from sparseft.quant.model import quantize_model
from sparseft.recipe import merge
from sparseft.runtime.bench import linear_bits, measure_generation, measure_seq2seq, seq2seq_inputs


def _check_seqlen(model: torch.nn.Module, seqlen: int) -> None:
    limit = max_positions(model.config)
    if limit is not None and seqlen > limit:
        raise SparseftError(
            f"seqlen {seqlen} is longer than the model allows ({limit}); use --seqlen {limit}"
        )


def _check_output(output: str | Path, overwrite: bool, *inputs: str | Path | None) -> None:
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise SparseftError(f"output {path} is a file; choose another --output")
    if path.exists() and not overwrite:
        raise SparseftError(
            f"output {path} already exists; remove it, choose another --output, or pass --overwrite"
        )
    _refuse_replacing(path, *inputs)


def _refuse_replacing(output: Path, *inputs: str | Path | None) -> None:
    """An output directory is replaced whole: refuse one that is, or holds, an input of the run."""
    if not output.exists():
        return
    out = output.resolve()
    for source in inputs:
        if source is not None and Path(source).exists():
            src = Path(source).resolve()
            if out == src or out in src.parents:
                raise SparseftError(
                    f"output {output} holds {source}, which this run reads, and replacing it would delete that; "
                    "choose another --output"
                )


@dataclass(frozen=True, eq=False)
class PruneResult(Mapping[str, Any]):
    """What `prune` returns: the pruned model, its tokenizer, and the report (`output/sparsity.json` when there
    is an output). It also reads as the report (`result["layers"]`), which is all that `prune` returned before."""

    model: torch.nn.Module
    tokenizer: Any
    report: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.report[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.report)

    def __len__(self) -> int:
        return len(self.report)


def prune(
    model: str | torch.nn.Module,
    output: str | Path | None = None,
    config: PruneConfig | None = None,
    *,
    tokenizer: Any = None,
    recipe: str | Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **settings: Any,
) -> PruneResult:
    """Prune `model` one-shot: a hub id or directory (loaded in `dtype`), or a loaded transformers model, pruned
    in place (give its `tokenizer` to calibrate or to save it). With an `output`, save a HF checkpoint with zeros
    kept there, with the report in `output/sparsity.json`; without one, write nothing.

    Settings are the fields of `PruneConfig` (method, sparsity, structure, targets, ignore, dataset, ...), given
    as a config, a YAML recipe, keyword arguments, or a mix (keywords win). Returns the pruned model, its
    tokenizer and the report (`PruneResult`).
    """
    cfg = config.model_copy(update=settings) if config is not None else prune_config(recipe, **settings)
    cfg = PruneConfig.model_validate(cfg.model_dump())
    if output is not None:
        _check_output(output, overwrite, None if isinstance(model, torch.nn.Module) else model, cfg.dataset)
    calibrated = cfg.method != "magnitude"
    if calibrated:
        if cfg.dataset is None:
            raise SparseftError(
                f"{cfg.method} needs calibration data: pass --dataset (a local file or a datasets name)"
            )
        check_local(cfg.dataset)
    started = time.perf_counter()
    if isinstance(model, torch.nn.Module):
        net, source = model, _loaded_name(model)
        if not isinstance(getattr(net, "config", None), transformers.PretrainedConfig):
            raise SparseftError(
                f"prune takes a transformers model (with its config), not a {type(net).__name__}; prune other "
                "modules with sparseft.pruning.sequential.prune_model"
            )
        if tokenizer is None and (calibrated or output is not None):
            raise SparseftError(
                f"pruning a loaded model {f'with {cfg.method}' if calibrated else 'to an output'} needs its "
                "tokenizer: pass tokenizer=..."
            )
        net_config = net.config
    else:
        source = model
        tokenizer = tokenizer or load_tokenizer(model, trust_remote_code)
        net_config = formats.load_config(model, trust_remote_code)
        net = load_model(model, dtype, trust_remote_code)
    settings_ = cfg.settings()
    targets = find_targets(net, cfg.targets or None, cfg.ignore)
    if settings_.structure is not None:
        for name, module in targets.items():
            settings_.structure.check_columns(weight_matrix(module).shape[1], name)
    samples: Any = None
    calibration = None
    if calibrated and model_kind(net_config) != "causal":
        samples, calibration = _pair_calibration(source, tokenizer, net, cfg, trust_remote_code)
    elif calibrated:
        assert cfg.dataset is not None
        _check_seqlen(net, cfg.seqlen)
        text = TextSource(cfg.dataset, cfg.dataset_config, cfg.split, cfg.text_field)
        samples = calibration_samples(tokenizer, text, cfg.num_samples, cfg.seqlen, cfg.seed)
        calibration = text.describe()

    fused = fused_weights(net)
    if fused:
        share = sum(fused.values()) / sum(p.numel() for p in net.parameters())
        warnings.warn(
            f"{len(fused)} weights of the blocks ({share:.0%} of the model's parameters, e.g. {next(iter(fused))}) "
            "are mixture-of-experts tensors that sparseft does not prune yet: they stay dense",
            SparseftWarning,
            stacklevel=2,
        )
    prune_model(net, targets, settings_, samples, device=device, progress=progress)

    layers = {
        name: {"shape": list(weight_matrix(m).shape), "sparsity": layer_sparsity(m)}
        for name, m in targets.items()
    }
    zeros = sum(int((weight_matrix(m) == 0).sum()) for m in targets.values())
    numel = sum(weight_matrix(m).numel() for m in targets.values())
    report = {
        "model": source,
        "method": cfg.method,
        "sparsity": settings_.sparsity,
        "structure": str(settings_.structure) if settings_.structure else "unstructured",
        "calibration": None
        if calibration is None
        else {**calibration, "num_samples": cfg.num_samples, "seqlen": cfg.seqlen, "seed": cfg.seed},
        "targets_sparsity": zeros / numel,
        "dense_fused_weights": fused,
        "seconds": round(time.perf_counter() - started, 2),
        "layers": layers,
    }
    if output is not None:
        with atomic_dir(output) as tmp:
            net.save_pretrained(tmp)  # type: ignore[operator]
            tokenizer.save_pretrained(tmp)
            seq2seq.save_feature_extractor(source, net_config, tmp, trust_remote_code)
            write_json(tmp / "sparsity.json", report)
            modelcard.write_card(tmp, source, output, trust_remote_code=trust_remote_code)
    return PruneResult(net, tokenizer, report)


def _pair_calibration(
    model: str, tokenizer: Any, net: torch.nn.Module, cfg: PruneConfig, trust_remote_code: bool
) -> tuple[Any, dict[str, Any]]:
    """Calibration samples for pruning the encoder-decoder `net` (loaded from `model`): examples of the config's
    dataset and `PairFields` (seqlen caps the tokens of each side), and their description for the report."""
    source = seq2seq.PairSource.from_config(cfg)
    encoding = seq2seq.Encoding.for_model(model, tokenizer, source, cfg.seqlen, trust_remote_code, net.config)
    examples = seq2seq.load_examples(source, encoding, cfg.num_samples, cfg.seed)
    dtype = next(net.parameters()).dtype
    samples = task_calibration(examples, cfg.num_samples, cfg.seqlen, cfg.seed, dtype)
    return samples, source.describe(encoding.kind)


def _loaded_name(model: torch.nn.Module) -> str:
    """Where a loaded model came from (transformers records the hub id or directory), else its class: the name
    its report and model card give as the source, and where a speech model's feature extractor is read."""
    return str(getattr(model, "name_or_path", "") or type(model).__name__)


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
    runtime: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
    decoder: str = "auto",
) -> dict[str, Any]:
    """Perplexity of `model` (a HF checkpoint or any export; with `runtime`, on the sparse CPU kernels, `decoder`
    as in `load_sparse`) on a dataset split, with the protocol recorded beside the figure."""
    if seqlen < 2 or batch_size < 1:
        raise SparseftError(
            f"seqlen must be at least 2 and batch_size at least 1, got {seqlen} and {batch_size}"
        )
    check_local(dataset)
    source = TextSource(dataset, dataset_config, split, text_field)
    texts = load_texts(source)  # before the model: a wrong field or split fails in seconds
    net, tokenizer = _eval_model(model, None, dtype, device, runtime, trust_remote_code, decoder)
    _check_seqlen(net, seqlen)
    stream = token_stream(tokenizer, texts)
    result = perplexity(net, stream, seqlen, batch_size, progress)
    return {
        "task": "ppl",
        "model": model,
        "runtime": runtime,
        **result,
        **source.describe(),
        "seqlen": seqlen,
        "protocol": "joined with blank lines, non-overlapping windows, exp(mean NLL)",
    }


# Tasks of `evaluate`; bleu and wer join this tuple and the dispatch in `evaluate`. lm-eval tasks: "lm-eval:NAME".
EVAL_TASKS = ("ppl", "gsm8k", "bleu", "wer")


def _eval_model(
    model: str | torch.nn.Module,
    tokenizer: Any,
    dtype: str,
    device: str,
    runtime: bool,
    trust_remote_code: bool,
    decoder: str = "auto",
) -> tuple[torch.nn.Module, Any]:
    """The model and tokenizer to evaluate: a loaded module as given, else read from a hub id or directory
    (HF checkpoint or any sparseft export; with `runtime`, on sparseft's sparse CPU kernels)."""
    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise SparseftError("evaluating a loaded model needs its tokenizer: pass tokenizer=...")
        return model, tokenizer
    # The tokenizer first: a directory without one fails in a second, not after the model has loaded.
    tokenizer = tokenizer or load_tokenizer(model, trust_remote_code)
    if runtime:
        net = load_sparse(model, trust_remote_code=trust_remote_code, decoder=decoder)
    elif Path(model).is_dir():
        net = load(model, dtype, trust_remote_code)
    else:
        net = load_model(model, dtype, trust_remote_code)
    return net.to(device).eval(), tokenizer


def qa_records(
    dataset: str,
    dataset_config: str | None = None,
    split: str = "test",
    question_field: str = "question",
    answer_field: str = "answer",
    limit: int | None = None,
    seed: int = 0,
) -> list[dict[str, str]]:
    """GSM8K-style records ({question, answer}) from a file, a datasets name, or the bundled generator."""
    if limit is not None and limit < 1:
        raise SparseftError(f"limit must be at least 1, got {limit}")
    if dataset == mathtask.NAME:
        return mathtask.generate(limit or 500, split, seed)
    check_local(dataset)
    records = load_records(dataset, dataset_config, split)
    missing = [f for f in (question_field, answer_field) if f not in records.column_names]
    if missing:
        raise SparseftError(
            f"dataset {dataset} has no field {', '.join(map(repr, missing))}; its fields are "
            f"{', '.join(records.column_names)} (choose with --question-field / --answer-field)"
        )
    if limit is not None:
        records = records.select(range(min(limit, len(records))))
    return [{"question": str(r[question_field]), "answer": str(r[answer_field])} for r in records]


def eval_gsm8k(
    model: str | torch.nn.Module,
    dataset: str | None = None,
    *,
    tokenizer: Any = None,
    dataset_config: str | None = None,
    split: str = "test",
    question_field: str = "question",
    answer_field: str = "answer",
    fewshot_dataset: str | None = None,
    num_fewshot: int = 0,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
    runtime: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
    decoder: str = "auto",
) -> dict[str, Any]:
    """GSM8K-style exact-match accuracy (see `sparseft.eval.gsm8k.gsm8k_accuracy`) on `dataset` (default: the
    bundled task, "mathtask"). Few-shot examples come from `fewshot_dataset` (its train split), the bundled
    task's train split, or else the evaluated records. `runtime` and `decoder` as in `eval_ppl`."""
    dataset = dataset or mathtask.NAME
    if num_fewshot < 0 or batch_size < 1 or max_new_tokens < 1:
        raise SparseftError("num_fewshot must be >= 0, batch_size and max_new_tokens >= 1")
    records = qa_records(dataset, dataset_config, split, question_field, answer_field, limit, seed)
    shots = None
    if num_fewshot:
        # Shots come from a train split, as lm-eval draws them; with none, from the whole evaluated split (never
        # only the records --limit kept, or the shots would change with --limit).
        source = fewshot_dataset or dataset
        try:
            shots = qa_records(source, dataset_config, "train", question_field, answer_field, 1000, seed)
        except SparseftError:
            if fewshot_dataset:
                raise
            shots = qa_records(dataset, dataset_config, split, question_field, answer_field, None, seed)
    net, tokenizer = _eval_model(model, tokenizer, dtype, device, runtime, trust_remote_code, decoder)
    result = gsm8k_accuracy(
        net, tokenizer, records, batch_size, max_new_tokens, num_fewshot, seed, shots, progress
    )
    return {
        "task": "gsm8k",
        "model": model if isinstance(model, str) else type(model).__name__,
        "dataset": {
            "dataset": dataset,
            "config": dataset_config,
            "split": split,
            "fewshot_dataset": fewshot_dataset,
        },
        "seed": seed,
        "runtime": runtime,
        **result,
    }


def eval_lm_eval(
    model: str | torch.nn.Module,
    tasks: list[str],
    *,
    tokenizer: Any = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    include_path: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    runtime: bool = False,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Any lm-evaluation-harness tasks on the model as sparseft loads it (runtime kernels included)."""
    # lm-eval reads a limit of 0 as no limit at all (every document)
    if (limit is not None and limit < 1) or batch_size < 1 or (num_fewshot is not None and num_fewshot < 0):
        raise SparseftError(
            f"lm-eval needs limit >= 1 (or none), batch_size >= 1 and num_fewshot >= 0, got {limit}, {batch_size} "
            f"and {num_fewshot}"
        )

    manager = lmeval.task_manager(include_path)
    lmeval.check_tasks(tasks, manager)  # before the model loads
    # lm-eval's HFLM wraps a transformers module: the runtime's transformers path, not its own decoder
    net, tokenizer = _eval_model(model, tokenizer, dtype, device, runtime, trust_remote_code, "transformers")
    result = lmeval.run_tasks(
        net,
        tokenizer,
        tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=batch_size,
        seed=seed,
        manager=manager,
    )
    return {
        "task": ",".join(lmeval.PREFIX + t for t in tasks),
        "model": model if isinstance(model, str) else type(model).__name__,
        "seed": seed,
        "runtime": runtime,
        "protocol": {
            "harness": "lm-evaluation-harness",
            "num_fewshot": num_fewshot,
            "limit": limit,
            "include_path": include_path,
        },
        **result,
    }


def _load_seq2seq(model: str, config: Any, dtype: str, runtime: bool, trust_remote_code: bool) -> Any:
    """An encoder-decoder (T5, Whisper) from a hub id, an HF directory or any export; with `runtime`, its pruned
    linears on sparseft's CPU kernels: a local Whisper on the runtime's own model (`runtime.models.WhisperModel`),
    the rest on transformers' model code."""
    local = Path(model).is_dir()
    exported = local and formats.detect(model) != "hf"
    if runtime and local and (config.model_type == "whisper" or formats.detect(model) == "bitmask"):
        return sparse_runtime.load(model, None, torch.bfloat16, trust_remote_code)
    if exported:
        net = formats.load_dir(model, torch.bfloat16 if runtime else parse_dtype(dtype), trust_remote_code)
    else:
        net = load_model(model, "bfloat16" if runtime else dtype, trust_remote_code)
    if runtime:
        sparse_runtime.sparsify_(net, "bf16")
    return net


def eval_seq2seq(
    model: str,
    task: str,
    dataset: str | None = None,
    *,
    config: Seq2SeqEvalConfig | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    runtime: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
    **settings: Any,
) -> dict[str, Any]:
    """BLEU of a translation model (T5; beam 5 by default, as the paper) or WER of a speech model (Whisper;
    greedy by default, after the normaliser) on `dataset` (see `sparseft.data.seq2seq` for its layouts).

    Settings are the fields of `Seq2SeqEvalConfig` (dataset, its `PairFields`, normalizer, limit, num_beams,
    ...), given as a config, keyword arguments, or both (keywords win); `runtime` runs the model on sparseft's
    sparse CPU kernels."""
    cfg: Seq2SeqEvalConfig = merge(
        Seq2SeqEvalConfig, config, {"dataset": dataset, **settings}, f"{task} settings"
    )
    if cfg.dataset is None:
        raise SparseftError(f"{task} needs --dataset: a local jsonl/csv file or a datasets name")
    num_beams = cfg.num_beams or (5 if task == "bleu" else 1)
    check_local(cfg.dataset)
    hf_config = formats.load_config(model, trust_remote_code)
    kind, wanted = model_kind(hf_config), "translation" if task == "bleu" else "speech"
    if kind != wanted:
        raise SparseftError(f"{task} scores a {wanted} model, but {model} is a {kind} model")
    tokenizer = load_tokenizer(model, trust_remote_code)
    source = seq2seq.PairSource.from_config(cfg)
    encoding = seq2seq.Encoding.for_model(model, tokenizer, source, 512, trust_remote_code, hf_config)
    examples = seq2seq.load_examples(source, encoding, cfg.limit)
    net = _load_seq2seq(model, hf_config, dtype, runtime, trust_remote_code).to(device).eval()
    # Whisper refuses to generate past its longest label sequence (prompt tokens included).
    limit_tokens = getattr(hf_config, "max_target_positions", None)
    max_new_tokens = min(cfg.max_new_tokens, limit_tokens - 4) if limit_tokens else cfg.max_new_tokens
    options = (
        {"language": cfg.target_lang, "task": "transcribe"} if kind == "speech" and cfg.target_lang else {}
    )
    pad_id = hf_config.pad_token_id if hf_config.pad_token_id is not None else 0
    batches = encoder_batches(examples, cfg.batch_size, pad_id)
    hypotheses = seq2seq_generate(net, tokenizer, batches, num_beams, max_new_tokens, progress, **options)
    references = [e.target for e in examples]
    metric = bleu(hypotheses, references) if task == "bleu" else wer(hypotheses, references, cfg.normalizer)
    return {
        "task": task,
        "model": model,
        **metric,
        "total": len(examples),
        "dataset": source.describe(kind),
        "seed": None,  # deterministic: beam search or greedy, no sampling
        "protocol": {
            "generation": f"beam search, {num_beams} beams" if num_beams > 1 else "greedy",
            "max_new_tokens": max_new_tokens,
            "source_prefix": encoding.prefix if kind == "translation" else None,
            "metric": "sacreBLEU BLEU"
            if task == "bleu"
            else f"jiwer WER after {cfg.normalizer} normalisation",
            "runtime": runtime,
        },
        "samples": [{"hypothesis": h, "reference": r} for h, r in zip(hypotheses, references, strict=True)],
    }


def evaluate(
    model: str | torch.nn.Module, task: str = "gsm8k", *, output: str | Path | None = None, **options: Any
) -> dict[str, Any]:
    """Evaluate `model` on `task`: "ppl" (`eval_ppl`), "gsm8k" (`eval_gsm8k`), "bleu" or "wer" (`eval_seq2seq`),
    or "lm-eval:NAME[,NAME...]" (`eval_lm_eval`); `options` are that function's keywords. The result, with model, task, protocol and seed,
    is also written to `output` as JSON when given."""
    if output is not None:
        check_json_target(output)
    if task.startswith(lmeval.PREFIX):
        names = [t.strip() for t in task.removeprefix(lmeval.PREFIX).split(",") if t.strip()]
        result = eval_lm_eval(model, names, **options)
    elif task == "gsm8k":
        result = eval_gsm8k(model, **options)
    elif task in ("bleu", "wer"):
        if not isinstance(model, str):
            raise SparseftError(f"{task} evaluates a model by hub id or directory; pass its path")
        result = eval_seq2seq(model, task, **options)
    elif task == "ppl":
        if not isinstance(model, str):
            raise SparseftError("ppl evaluates a model by hub id or directory; pass its path")
        if options.get("dataset") is None:
            raise SparseftError("ppl needs --dataset: a local text file or a datasets name")
        result = eval_ppl(model, **options)
        result.setdefault("seed", None)  # deterministic: no sampling anywhere
    else:
        raise SparseftError(f"unknown task {task!r}; use one of {', '.join(EVAL_TASKS)} or lm-eval:TASK")
    if output is not None:
        write_json(output, result)
        modelcard.refresh_evaluation(Path(output).parent)  # a result saved beside a sparseft card joins it
    return result


def _checkpoint_dtype(model: str) -> torch.dtype:
    """The dtype a checkpoint was saved in (its config's dtype), float32 when it does not say."""
    try:
        stored = getattr(transformers.AutoConfig.from_pretrained(model), "dtype", None)
    except (OSError, ValueError):
        return torch.float32
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) and stored.is_floating_point else torch.float32


def export(
    model: str,
    output: str | Path,
    format: str | None = None,
    quantize: str | None = None,
    group_size: int | None = None,
    method: str | None = None,
    *,
    config: ExportConfig | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    trust_remote_code: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **settings: Any,
) -> dict[str, Any]:
    """Export a (pruned) HF checkpoint as `format` "hf" (zeros kept; with `quantize`, compressed-tensors
    pack-quantized) or "bitmask" (the compact archive laid out in sparseft/formats/bitmask.py), optionally
    quantizing the target linears to "int8" (per channel) or "int4" (per group of `group_size`) by `method` "rtn"
    or "gptq" (calibrated on `dataset` like pruning). Returns the report also written to `output/export.json`.

    Settings are the fields of `ExportConfig` (format, quantize, group_size, method, targets, ignore, dataset,
    num_samples, ...), given as a config, keyword arguments, or both (keywords win). `dtype` (default: the
    checkpoint's own), `device`, `trust_remote_code`, `overwrite` and `progress` are how to run it."""
    given = {"format": format, "quantize": quantize, "group_size": group_size, "method": method, **settings}
    cfg: ExportConfig = merge(ExportConfig, config, given, "export settings")
    spec = cfg.spec()
    if cfg.method == "gptq" and cfg.dataset is not None:
        check_local(cfg.dataset)
    _check_output(output, overwrite, model, cfg.dataset)
    started = time.perf_counter()
    if Path(model).is_dir():  # any export reads back too: re-export a bitmask archive as HF, say
        net = formats.load_dir(model, parse_dtype(dtype) if dtype else None, trust_remote_code)
    else:
        net = load_model(model, dtype or _checkpoint_dtype(model), trust_remote_code)
    net_config: Any = net.config
    try:
        tokenizer = load_tokenizer(model, trust_remote_code)
    except SparseftError:
        tokenizer = None  # a model without a tokenizer exports fine; GPTQ below needs one
    chosen = find_targets(net, cfg.targets, cfg.ignore)
    vllm: list[str] = []  # why vLLM may refuse a compressed-tensors export; the checkpoint itself is right
    if spec is not None and cfg.format == "hf":
        for name, module in chosen.items():
            if not isinstance(module, torch.nn.Linear):
                raise SparseftError(
                    f"{name} is a {type(module).__name__}; compressed-tensors quantizes nn.Linear only: "
                    "use --format bitmask for this model"
                )
            if spec.group_size is not None and module.in_features % spec.group_size:
                raise SparseftError(
                    f"{name} has {module.in_features} inputs, not a multiple of --group-size {spec.group_size}; "
                    "vLLM needs whole groups: choose a group size that divides it, or use --format bitmask"
                )
        vllm = formats.vllm_problems(net, set(chosen), spec)
        for problem in vllm:
            warnings.warn(problem, SparseftWarning, stacklevel=2)

    quantized = None
    errors: dict[str, dict[str, float]] = {}
    calibration = None
    if spec is not None:
        samples = None
        if cfg.method == "gptq":
            assert cfg.dataset is not None
            if model_kind(net_config) != "causal":
                raise SparseftError(
                    f"GPTQ export calibrates decoder-only models; {net_config.model_type} is an encoder-decoder: "
                    "use --quant-method rtn"
                )
            if tokenizer is None:
                raise SparseftError(
                    f"GPTQ tokenizes calibration text, but {model} has no tokenizer: save one"
                )
            _check_seqlen(net, cfg.seqlen)
            source = TextSource(cfg.dataset, cfg.dataset_config, cfg.split, cfg.text_field)
            samples = calibration_samples(tokenizer, source, cfg.num_samples, cfg.seqlen, cfg.seed)
            calibration = {
                **source.describe(),
                "num_samples": cfg.num_samples,
                "seqlen": cfg.seqlen,
                "seed": cfg.seed,
            }
        quantized, errors = quantize_model(net, chosen, spec, cfg.method, samples, device, progress)

    layers: dict[str, dict[str, Any]] = {
        name: {"shape": list(weight_matrix(m).shape), "sparsity": layer_sparsity(m), **errors.get(name, {})}
        for name, m in chosen.items()
    }
    report: dict[str, Any] = {
        "model": model,
        "format": cfg.format,
        "dtype": str(next(net.parameters()).dtype).removeprefix("torch."),
        "quantization": None if spec is None else {**spec.describe(), "method": cfg.method},
        "calibration": calibration,
        "layers": layers,
    }
    if spec is not None and cfg.format == "hf":
        report["vllm_warnings"] = vllm
    for key in ("rtn_weight_error", "gptq_weight_error", "rtn_output_error", "gptq_output_error"):
        values = [v[key] for v in layers.values() if key in v]
        if values:
            report[f"mean_{key}"] = sum(values) / len(values)
    with atomic_dir(output) as tmp:
        if cfg.format == "bitmask":
            formats.write_bitmask(net, chosen, tmp, quantized, report["quantization"])
        elif quantized is not None:
            assert spec is not None
            formats.write_hf_quantized(net, quantized, spec, tmp)
        else:
            net.save_pretrained(tmp)  # type: ignore[operator]
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        # a speech model's features come from its own extractor; a source without one exports without one
        if model_kind(net_config) == "speech":
            with contextlib.suppress(SparseftError):
                seq2seq.save_feature_extractor(model, net_config, tmp, trust_remote_code)
        report["size_on_disk"] = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
        report["seconds"] = round(time.perf_counter() - started, 2)
        write_json(tmp / "export.json", report)
        modelcard.write_card(tmp, model, output, trust_remote_code=trust_remote_code)
    return report


def load(path: str | Path, dtype: str | None = None, trust_remote_code: bool = False) -> torch.nn.Module:
    """Read any export (bitmask archive, HF checkpoint, HF + compressed-tensors int8/int4) back into a dense
    transformers model, in its stored dtype unless `dtype` is given; one weight is decoded at a time."""
    return formats.load_dir(path, parse_dtype(dtype) if dtype else None, trust_remote_code)


def info(path: str | Path) -> dict[str, Any]:
    """Format, per-layer sparsity and bits, size on disk and bytes per weight of an exported directory."""
    return formats.describe(path)


def finetune(
    model: str | None,
    output: str | Path,
    teacher: str | None = None,
    dataset: str | None = None,
    *,
    recipe: str | Path | None = None,
    loss: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **settings: Any,
) -> dict[str, Any]:
    """Sparse fine-tuning, stage by stage (optional prune, then train with the mask fixed, distilling from the
    dense `teacher`), into `output/model`; `model` may be None when the recipe names it. Returns the summary
    that is also written to `output/metrics.json`.

    Settings come from a YAML recipe (`FinetuneConfig`), overridden by keywords: `loss` (ce, kd, squarehead),
    and dotted section keys such as `data__seqlen=256`, `train__lr=1e-4`, `loss__kd=0.5` (`__` for the dot).
    Run it under `accelerate launch` for several processes (DDP) or FSDP.
    """
    overrides = {key.replace("__", "."): value for key, value in settings.items()}
    named = {"model": model, "teacher": teacher, "data.dataset": dataset, "loss.name": loss}
    cfg = finetune_config(recipe, **named, **overrides)
    if overwrite and not resume:
        _refuse_replacing(Path(output), cfg.model, cfg.teacher, cfg.data.dataset)
    return run_finetune(cfg, output, resume=resume, overwrite=overwrite, progress=progress)


def load_sparse(
    path: str | Path,
    values: str | None = None,
    dtype: str = "bfloat16",
    trust_remote_code: bool = False,
    head_values: str = "bf16",
    decoder: str = "auto",
) -> torch.nn.Module:
    """A model whose pruned linears run on sparseft's CPU kernels (`SparseLinear`, bf16, int8 or int4 values), from a
    bitmask archive (read straight into them, never dense) or an HF checkpoint with zeros kept.
    `decoder`: "auto" runs Llama-family models on the runtime's own decoder and the rest on transformers' model
    code; "sparseft" or "transformers" insists (lm-eval needs "transformers"). `head_values="int8"` also
    quantizes the LM head to int8 (half its bytes; logits change slightly)."""
    if values not in (None, "bf16", "int8", "int4"):
        raise SparseftError(f"values must be bf16, int8 or int4, got {values!r}")
    if head_values not in (None, "bf16", "int8"):
        raise SparseftError(f"head_values must be bf16 or int8, got {head_values!r}")
    return sparse_runtime.load(
        path,
        values,  # type: ignore[arg-type]
        parse_dtype(dtype),
        trust_remote_code,
        head_values=head_values,  # type: ignore[arg-type]
        decoder=decoder,
    )


def generate(
    model: str | Path,
    prompt: str | list[dict[str, str]],
    max_new_tokens: int = 64,
    values: str | None = None,
    sample: bool = False,
    trust_remote_code: bool = False,
    head_values: str = "bf16",
    decoder: str = "auto",
    *,
    chat: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    threads: int | None = None,
    on_text: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Generate a continuation of `prompt` with the sparse CPU runtime; the result says which decoder ran
    (`load_sparse`).

    `chat` (or a list of messages, `{"role": ..., "content": ...}`, as `prompt`) puts the prompt as a user message
    through the tokenizer's chat template and answers it. Decoding is greedy unless `sample` or any of
    `temperature`, `top_p` and `top_k` is given; `seed` makes the sampling reproducible. `threads` sets torch's
    CPU threads for the call. `on_text` gets the new text piece by piece as it is generated; the pieces add up to
    the result's `text`."""
    options = _decoding_options(sample, temperature, top_p, top_k, seed)
    _check_run(max_new_tokens, threads)
    with _torch_threads(threads):
        tokenizer, net = _load_text_model(
            model, values, trust_remote_code, head_values, decoder, chat or not isinstance(prompt, str)
        )
        if isinstance(prompt, str) and chat:
            prompt = [{"role": "user", "content": prompt}]
        return _reply(net, tokenizer, prompt, max_new_tokens, options, seed, on_text)


def chat(
    model: str | Path,
    turns: Iterable[str],
    max_new_tokens: int = 64,
    values: str | None = None,
    trust_remote_code: bool = False,
    head_values: str = "bf16",
    decoder: str = "auto",
    *,
    sample: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    threads: int | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """A conversation with the model loaded once: yields `generate`'s result for the reply to each user message
    of `turns`, read only once the previous reply is out (so `turns` may wait for the user to type). Every prompt
    holds the whole conversation so far, through the tokenizer's chat template. The options are `generate`'s;
    with `seed`, each reply is sampled from that seed."""
    options = _decoding_options(sample, temperature, top_p, top_k, seed)
    _check_run(max_new_tokens, threads)
    with _torch_threads(threads):
        tokenizer, net = _load_text_model(model, values, trust_remote_code, head_values, decoder, True)
    messages: list[dict[str, str]] = []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        with _torch_threads(threads):  # not held across the yield: the caller's code runs there
            result = _reply(net, tokenizer, messages, max_new_tokens, options, seed, on_text)
        messages.append({"role": "assistant", "content": result["text"]})
        yield result


def _decoding_options(
    sample: bool, temperature: float | None, top_p: float | None, top_k: int | None, seed: int | None
) -> dict[str, Any]:
    """The decoding arguments of the models' `generate`: greedy, or sampling when `sample` or any of `temperature`,
    `top_p` and `top_k` is given (those left out are off)."""
    if temperature is not None and not temperature > 0:
        raise SparseftError(
            f"temperature must be above 0, got {temperature}; leave it out for greedy decoding"
        )
    if top_p is not None and not 0 < top_p <= 1:
        raise SparseftError(f"top_p must be above 0 and at most 1, got {top_p}")
    if top_k is not None and top_k < 1:
        raise SparseftError(f"top_k must be 1 or more, got {top_k}; leave it out to keep every token")
    if seed is not None and not 0 <= seed < 2**64:
        raise SparseftError(f"seed must be from 0 to 2**64 - 1, got {seed}")
    if not (sample or temperature is not None or top_p is not None or top_k is not None):
        if seed is not None:
            warnings.warn(
                "the seed has no effect on greedy decoding; sample (or give a temperature, top_p or top_k) "
                "to use it",
                SparseftWarning,
                stacklevel=3,
            )
        return {"do_sample": False}
    # explicit values, so the defaults of a checkpoint's generation_config (transformers path) do not apply
    return {
        "do_sample": True,
        "temperature": 1.0 if temperature is None else temperature,
        "top_p": 1.0 if top_p is None else top_p,
        "top_k": top_k or 0,
    }


def _check_run(max_new_tokens: int, threads: int | None) -> None:
    if max_new_tokens < 1:
        raise SparseftError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if threads is not None and threads < 1:
        raise SparseftError(f"threads must be 1 or more, got {threads}")


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads set to `threads` inside the block (when given), and back as they were after it."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _load_text_model(
    model: str | Path, values: str | None, trust_remote_code: bool, head_values: str, decoder: str, chat: bool
) -> tuple[Any, torch.nn.Module]:
    """The tokenizer and the sparse model; a chat without a chat template is refused before the weights load."""
    tokenizer = load_tokenizer(str(model), trust_remote_code)
    if chat and not tokenizer.chat_template:
        raise SparseftError(
            f"the tokenizer of {model} has no chat template; leave out chat (--chat) to continue the prompt as "
            "plain text, or save a tokenizer that has one beside the model"
        )
    net = load_sparse(
        model, values, trust_remote_code=trust_remote_code, head_values=head_values, decoder=decoder
    )
    return tokenizer, net


def _reply(
    net: torch.nn.Module,
    tokenizer: Any,
    prompt: str | list[dict[str, str]],
    max_new_tokens: int,
    options: dict[str, Any],
    seed: int | None,
    on_text: Callable[[str], None] | None,
) -> dict[str, Any]:
    """`generate`'s result for one prompt: plain text, or messages through the chat template."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    else:
        ids = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).input_ids
    if ids.shape[1] == 0:
        raise SparseftError("the prompt is empty (no tokens); give some text to continue")
    _check_positions(net.config, ids.shape[1] + max_new_tokens, "the prompt and max_new_tokens")
    streamer = None if on_text is None else _text_streamer(tokenizer, on_text)
    started = time.perf_counter()
    # a seed applies to this call only: torch's global generator is put back as it was after it
    with torch.inference_mode(), torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        out = net.generate(
            ids,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
            **options,
        )  # type: ignore[operator]
    seconds = time.perf_counter() - started
    new = out[0, ids.shape[1] :]
    return {
        "decoder": net.decoder_name,
        "text": tokenizer.decode(new, skip_special_tokens=True),
        "prompt_tokens": ids.shape[1],
        "new_tokens": len(new),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(len(new) / seconds, 2),
    }


def _text_streamer(tokenizer: Any, on_text: Callable[[str], None]) -> Any:
    """A streamer for the models' `generate` that hands the new text to `on_text` as it is decoded: transformers'
    `TextStreamer` (which holds back a word until it cannot change) with its printing replaced."""

    class TextCallback(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                on_text(text)

    return TextCallback(tokenizer, skip_prompt=True, skip_special_tokens=True)


def bench(
    model: str | Path,
    prompt_tokens: int = 128,
    new_tokens: int = 64,
    runs: int = 3,
    values: str | None = None,
    trust_remote_code: bool = False,
    *,
    sentences: int = 32,
    source_tokens: int = 32,
    num_beams: int | None = None,
    head_values: str = "bf16",
    decoder: str = "auto",
) -> dict[str, Any]:
    """Speed and memory, sparse (sparseft kernels) vs dense bf16 (transformers), measured side by side in one
    process, alternating run by run.

    A decoder-only model: prefill and decode tokens/s of a `prompt_tokens` prompt and `new_tokens` new tokens.
    An encoder-decoder: encoder latency, decoder tokens/s and job time (`runtime.bench.measure_seq2seq`) of
    `new_tokens` new tokens per input, with `num_beams` beams (default 5 for translation, as the paper; greedy
    for speech). T5 translates `sentences` random sentences of `source_tokens` tokens, one at a time; Whisper
    transcribes one 30 s window of random features. `head_values="int8"`: the sparse model's LM head in int8."""
    at_least = {
        "prompt_tokens": (prompt_tokens, 1),
        "new_tokens": (new_tokens, 2),
        "runs": (runs, 1),
        "sentences": (sentences, 1),
        "source_tokens": (source_tokens, 1),
        "num_beams": (1 if num_beams is None else num_beams, 1),
    }
    for name, (value, least) in at_least.items():
        if value < least:
            raise SparseftError(f"bench needs {name} >= {least}, got {value}")
    sparse = load_sparse(
        model, values, trust_remote_code=trust_remote_code, head_values=head_values, decoder=decoder
    )
    kind = model_kind(sparse.config)
    if kind == "speech":
        _check_transcript_length(sparse.config, new_tokens)
    if kind == "causal":
        _check_positions(sparse.config, prompt_tokens + new_tokens, "prompt_tokens + new_tokens")
    stored = next((m.kind for m in sparse.modules() if hasattr(m, "kind")), "bf16")
    dense = formats.load_dir(model, torch.bfloat16, trust_remote_code)
    models = {f"sparse {stored}": sparse, "dense bf16": dense}
    if kind == "causal":
        workload: dict[str, Any] = {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens}
        result = measure_generation(models, prompt_tokens, new_tokens, runs)
    else:
        beams = num_beams or (5 if kind == "translation" else 1)
        inputs, workload = seq2seq_inputs(sparse.config, sentences, source_tokens)
        workload |= {"new_tokens": new_tokens, "num_beams": beams}
        result = measure_seq2seq(models, inputs, new_tokens, beams, runs)
    result["_machine"]["kernels"] = sparse_runtime.current_isa()
    vocab = int(getattr(sparse.config, "vocab_size", 0))
    for name, net in models.items():
        result[name]["bits_per_weight"] = linear_bits(net, vocab)
    return {
        "model": str(model),
        "kind": kind,
        "decoder": sparse.decoder_name,
        **workload,
        "runs": runs,
        "results": result,
    }


def _check_positions(config: Any, tokens: int, what: str) -> None:
    # Models with learned position embeddings (GPT-2, OPT) fail deep inside their embedding past this length;
    # the others were not trained past it either.
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and tokens > limit:
        raise SparseftError(
            f"{config.model_type} takes at most {limit} positions (max_position_embeddings), but {what} are "
            f"{tokens}; ask for fewer"
        )


def _check_transcript_length(config: Any, new_tokens: int) -> None:
    # Whisper refuses to generate past its longest label sequence, start tokens included (up to 4).
    longest = int(config.max_target_positions) - 4
    if new_tokens > longest:
        raise SparseftError(
            f"{config.model_type} writes at most {longest} new tokens (max_target_positions "
            f"{config.max_target_positions} less its start tokens), got new_tokens={new_tokens}; ask for fewer"
        )
