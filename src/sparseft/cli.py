"""The `sparseft` command line: parses flags, calls `sparseft.api`, prints. No logic of its own.

Each verb imports the modules it needs when it runs (`run_*`), not when this module is imported: torch,
transformers and datasets take seconds to import, which `sparseft --help` and a typo in a flag should not wait for.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from sparseft import __version__
from sparseft.errors import SparseftError, SparseftWarning
from sparseft.io import check_json_target, write_json

DESCRIPTION = """\
Prune, sparse fine-tune, export and run large language models, sparse and fast.

A model goes through `sparseft prune` (one-shot: magnitude, Wanda or SparseGPT), `sparseft finetune` (with the
zeros fixed, distilling from a dense teacher), `sparseft export` (a compact bitmask archive or a Hugging Face
checkpoint, int8/int4), then `sparseft generate`, `bench` or `serve` on the sparse CPU runtime; `sparseft eval`
scores any stage. `sparseft VERB --help` lists a verb's flags with their defaults."""


def _version() -> str:
    try:
        return version("sparseft")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return __version__


class _HelpFormatter(argparse.HelpFormatter):
    """Each flag's help ends with its default, where it has one. argparse's ArgumentDefaultsHelpFormatter also
    writes "(default: None)" for flags whose default a recipe or the model decides, and "(default: False)" for
    switches; those help texts say their default in words, or have none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if not action.option_strings or default is None or default is False or default == argparse.SUPPRESS:
            return text
        if "%(default)" in text or "(default:" in text:
            return text
        return f"{text} (default: %(default)s)".strip()


class _OldSpelling(argparse.Action):
    """A flag's old spelling: it sets what the new spelling sets, and warns that it goes away."""

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        message = f"{option_string} is now {self.new}; the old spelling stops working in the next release"
        warnings.warn(message, SparseftWarning, stacklevel=2)
        setattr(namespace, self.dest, values)


def _old_spelling(p: argparse.ArgumentParser, old: str, new: argparse.Action) -> None:
    """Keep `old` working for one release as the flag `new` (the action `add_argument` returned), hidden from the
    help. The warning is printed by `main` as one line."""
    p.add_argument(
        old,
        action=_OldSpelling,
        new=new.option_strings[0],
        dest=new.dest,
        type=new.type or str,  # str: what argparse does without a type
        choices=new.choices,
        metavar=new.metavar,
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
    )


def _verb(sub: Any, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help, description=description or help, formatter_class=_HelpFormatter
    )
    return parser


# Flags that mean the same in every verb that has them, added by these functions.


def _add_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        default="auto",
        help="weights' dtype once loaded: float32, bfloat16, float16, or auto (the checkpoint's own)",
    )


def _add_device(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--device", default="auto", help=f"{what}: cpu, cuda, or auto (cuda when there is a GPU)")


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: torch's, one per core)")


def _add_values(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--values",
        choices=["bf16", "int8", "int4"],
        help="weight values in memory (default: as exported; int4 from a bf16 or int8 export quantizes per group of "
        "128 columns at load)",
    )


def _add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _add_trust_remote_code(p: argparse.ArgumentParser, keep_recipe: bool = False) -> None:
    """`keep_recipe`: left out, the flag keeps the recipe's value (None), not False."""
    p.add_argument(
        "--trust-remote-code",
        action="store_const",
        const=True,
        default=None if keep_recipe else False,
        help="run the model repository's own Python code (only for repositories you trust)",
    )


def _dtype(choice: str, model: str) -> str:
    """--dtype: `auto` becomes the dtype `model` was saved in (float32 when its config does not say)."""
    if choice != "auto":
        return choice
    from sparseft.api import _checkpoint_dtype  # when the verb runs, as its modules are (module docstring)

    return str(_checkpoint_dtype(model)).removeprefix("torch.")


def _device(choice: str) -> str:
    """--device: `auto` becomes cuda when torch sees a GPU, else cpu."""
    if choice != "auto":
        return choice
    import torch  # when the verb runs, as its modules are (module docstring)

    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """--threads: torch's CPU threads while the verb runs, as they were after it (`main` may be called again in
    the same process, as the tests and a notebook do)."""
    if count is None:
        yield
        return
    if count < 1:
        raise SparseftError(f"--threads must be 1 or more, got {count}")
    from sparseft.api import _torch_threads  # when the verb runs, as its modules are (module docstring)

    with _torch_threads(count):
        yield


@contextlib.contextmanager
def _quiet(quiet: bool) -> Iterator[None]:
    """-q: the progress bars that transformers, the hub and datasets draw (loading weights, downloads, maps) off
    too while the verb runs; sparseft's own bars are turned off by the verbs (`progress=False`)."""
    if not quiet:
        yield
        return
    # when the verb runs, as its modules are (module docstring)
    import datasets
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if shown[0]:
            logging.enable_progress_bar()
        if shown[1]:
            datasets.enable_progress_bars()


def _list(text: str | None) -> list[str] | None:
    return [item.strip() for item in text.split(",") if item.strip()] if text else None


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


# Flags of encoder-decoder data (T5 translation, Whisper speech), with their metavar and help; see
# `sparseft.data.seq2seq`.
PAIR_FIELDS = {
    "source_lang": ("LANG", "translation: source language code in translation records (e.g. en)"),
    "target_lang": (
        "LANG",
        "translation: target language code (e.g. de); speech: Whisper's language (e.g. hi)",
    ),
    "source_field": ("FIELD", "translation: source column when not by language (default: source)"),
    "target_field": ("FIELD", "translation: target column when not by language (default: target)"),
    "source_prefix": ("TEXT", "translation: text before each source (default: T5's task prefix)"),
    "audio_field": ("FIELD", "speech: column of audio paths or datasets audio (default: audio)"),
}


def _add_pair_fields(p: argparse.ArgumentParser, section: str = "") -> None:
    """Add PAIR_FIELDS; `section` ("data.") files them under a recipe section."""
    for name, (metavar, text) in PAIR_FIELDS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=section + name, metavar=metavar, help=text)


def _pair_fields(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in PAIR_FIELDS}


def add_prune(sub: Any) -> None:
    p = _verb(sub, "prune", "one-shot prune a causal LM, T5 or Whisper (magnitude/wanda/sparsegpt)")
    p.add_argument("model", help="hub id or local directory of a Hugging Face causal LM, T5 or Whisper")
    p.add_argument("--output", "-o", required=True, help="directory for the pruned checkpoint")
    p.add_argument("--recipe", help="YAML file with the same settings (flags override it)")
    # No argparse defaults below: a flag left out keeps the recipe's value, else PruneConfig's (the help says it).
    p.add_argument(
        "--method", choices=["magnitude", "wanda", "sparsegpt"], help="pruning algorithm (default: sparsegpt)"
    )
    p.add_argument(
        "--sparsity", type=float, help="fraction of zeros, e.g. 0.7 (default: 0.5, or N/M with --structure)"
    )
    p.add_argument(
        "--structure", metavar="N:M", help="N zeros in every M consecutive inputs, e.g. 2:4 (default: none)"
    )
    p.add_argument(
        "--targets",
        help="comma-separated module names, class names or re:regex (default: all linears in blocks)",
    )
    p.add_argument("--ignore", help="comma-separated module names, class names or re:regex to leave dense")
    p.add_argument(
        "--dataset",
        help="calibration text (T5: translation pairs; Whisper: speech): a local file or a datasets name",
    )
    p.add_argument(
        "--dataset-config", metavar="NAME", help="the datasets configuration, e.g. wikitext-2-raw-v1"
    )
    p.add_argument("--split", help="the split to calibrate on (default: train)")
    p.add_argument(
        "--text-field",
        metavar="FIELD",
        help="the text column (speech: the transcript column) (default: text)",
    )
    _add_pair_fields(p)
    p.add_argument("--num-samples", type=int, metavar="N", help="calibration windows (default: 128)")
    p.add_argument(
        "--seqlen", type=int, metavar="TOKENS", help="tokens per calibration window (default: 2048)"
    )
    p.add_argument("--seed", type=int, help="picks the calibration windows (default: 0)")
    _add_device(p, "compute device for one block at a time")
    _add_dtype(p)
    _add_threads(p)
    _add_quiet(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    _add_trust_remote_code(p)
    p.set_defaults(run=run_prune)


def run_prune(args: argparse.Namespace) -> None:
    from sparseft import api

    report = api.prune(
        args.model,
        args.output,
        recipe=args.recipe,
        device=_device(args.device),
        dtype=_dtype(args.dtype, args.model),
        trust_remote_code=args.trust_remote_code,
        overwrite=args.overwrite,
        progress=not args.quiet,
        method=args.method,
        sparsity=args.sparsity,
        structure=args.structure,
        targets=_list(args.targets),
        ignore=_list(args.ignore),
        dataset=args.dataset,
        dataset_config=args.dataset_config,
        split=args.split,
        text_field=args.text_field,
        **_pair_fields(args),
        num_samples=args.num_samples,
        seqlen=args.seqlen,
        seed=args.seed,
    )
    print(
        f"pruned {len(report['layers'])} layers with {report['method']} ({report['structure']}): "
        f"{report['targets_sparsity']:.2%} zeros in the targets, {report['seconds']} s -> {args.output}"
    )


def add_eval(sub: Any) -> None:
    p = _verb(
        sub,
        "eval",
        help="evaluate a model: `sparseft eval MODEL --task gsm8k|ppl|lm-eval:NAME` (or `sparseft eval ppl MODEL`)",
    )
    p.add_argument(
        "positional", nargs="+", metavar="[TASK] MODEL", help="hub id or local directory (any export)"
    )
    p.add_argument(
        "--task", help="ppl, gsm8k, bleu (T5), wer (Whisper), or lm-eval:NAME[,NAME] (lm-evaluation-harness)"
    )
    p.add_argument(
        "--lm-eval-tasks",
        metavar="NAMES",
        help="comma-separated lm-eval tasks (same as --task lm-eval:NAMES)",
    )
    p.add_argument(
        "--dataset",
        help="ppl: text; gsm8k: question/answer records (default: mathtask, the bundled generator's test split)",
    )
    p.add_argument("--dataset-config", metavar="NAME", help="the datasets configuration, e.g. main")
    p.add_argument("--split", default="test", help="the split to evaluate")
    p.add_argument("--text-field", default="text", metavar="FIELD", help="ppl: the text column")
    p.add_argument("--seqlen", type=int, default=2048, metavar="TOKENS", help="ppl: window length")
    p.add_argument("--question-field", default="question", metavar="FIELD", help="gsm8k: the question column")
    p.add_argument(
        "--answer-field",
        default="answer",
        metavar="FIELD",
        help="gsm8k: the worked answer column (ends in #### N)",
    )
    p.add_argument(
        "--fewshot-dataset",
        metavar="DATASET",
        help="gsm8k: draw few-shot examples from this dataset's train split",
    )
    p.add_argument(
        "--num-fewshot",
        type=int,
        metavar="N",
        help="few-shot examples (default: 0 for gsm8k, the task's own for lm-eval)",
    )
    p.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N examples (default: all)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=256,
        metavar="N",
        help="gsm8k, bleu, wer: longest generated answer",
    )
    p.add_argument("--seed", type=int, default=0, help="few-shot sampling and the bundled task's problems")
    p.add_argument(
        "--lm-eval-include",
        metavar="DIR",
        help="lm-eval: a folder of extra task YAMLs (e.g. over local files)",
    )
    _add_pair_fields(p)
    p.add_argument("--normalizer", default="basic", help="wer: Whisper's basic or english normaliser, none")
    p.add_argument(
        "--num-beams",
        type=int,
        metavar="N",
        help="bleu/wer: beam search width (default: 5 for bleu, 1 for wer)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="examples per batch (default: 1 for ppl, 16 for bleu/wer, 8 otherwise)",
    )
    p.add_argument(
        "--runtime", action="store_true", help="run on sparseft's sparse CPU kernels (SparseLinear)"
    )
    p.add_argument(
        "--decoder",
        choices=["auto", "sparseft", "transformers"],
        default="auto",
        help="with --runtime, ppl and gsm8k: sparseft's own decoder (Llama family), transformers' with sparse "
        "linears, or auto",
    )
    _add_dtype(p)
    _add_device(p, "where the model runs (cpu with --runtime)")
    _add_threads(p)
    _add_quiet(p)
    json_file = p.add_argument(
        "--json", metavar="FILE", help="also write the result (with every generated sample) as JSON to FILE"
    )
    _old_spelling(p, "--output", json_file)
    _add_trust_remote_code(p)
    p.set_defaults(run=run_eval)


def _eval_task(args: argparse.Namespace) -> tuple[str, str]:
    """(task, model) from `eval [TASK] MODEL`, --task and --lm-eval-tasks; the old `eval ppl MODEL` still works."""
    flagged = [t for t in (args.task, args.lm_eval_tasks and "lm-eval:" + args.lm_eval_tasks) if t]
    if len(args.positional) > 2:
        raise SparseftError(f"eval takes [TASK] MODEL, got {' '.join(args.positional)}")
    if len(args.positional) == 2:
        flagged.insert(0, args.positional[0])
    if len(flagged) != 1:
        raise SparseftError("name exactly one task: --task ppl, --task gsm8k or --task lm-eval:NAME")
    return flagged[0], args.positional[-1]


def run_eval(args: argparse.Namespace) -> None:
    from sparseft import api

    task, model = _eval_task(args)
    if args.batch_size is not None and args.batch_size < 1:  # not replaced by a default below
        raise SparseftError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.decoder != "auto" and not args.runtime:
        raise SparseftError(
            f"--decoder {args.decoder} chooses the sparse runtime's model code: add --runtime"
        )
    if args.decoder == "sparseft" and task not in ("ppl", "gsm8k"):
        raise SparseftError(
            f"--decoder sparseft runs ppl and gsm8k; {task} runs on transformers' model code (leave --decoder out)"
        )
    device = "cpu" if args.runtime and args.device == "auto" else _device(args.device)
    common = {
        "dtype": _dtype(args.dtype, model),
        "device": device,
        "trust_remote_code": args.trust_remote_code,
    }
    options: dict[str, Any]
    if task == "ppl":
        options = {
            "dataset": args.dataset,
            "dataset_config": args.dataset_config,
            "split": args.split,
            "text_field": args.text_field,
            "seqlen": args.seqlen,
            "batch_size": args.batch_size or 1,
            "runtime": args.runtime,
            "decoder": args.decoder,
            "progress": not args.quiet,
        }
    elif task == "gsm8k":
        options = {
            "dataset": args.dataset,
            "dataset_config": args.dataset_config,
            "split": args.split,
            "question_field": args.question_field,
            "answer_field": args.answer_field,
            "fewshot_dataset": args.fewshot_dataset,
            "num_fewshot": args.num_fewshot or 0,
            "limit": args.limit,
            "batch_size": args.batch_size or 8,
            "max_new_tokens": args.max_new_tokens,
            "seed": args.seed,
            "runtime": args.runtime,
            "decoder": args.decoder,
            "progress": not args.quiet,
        }
    elif task in ("bleu", "wer"):
        options = {
            "dataset": args.dataset,
            "dataset_config": args.dataset_config,
            "split": args.split,
            **_pair_fields(args),
            "text_field": args.text_field,
            "normalizer": args.normalizer,
            "limit": args.limit,
            "batch_size": args.batch_size or 16,
            "num_beams": args.num_beams,
            "max_new_tokens": args.max_new_tokens,
            "runtime": args.runtime,
            "progress": not args.quiet,
        }
    else:  # lm-eval:NAMES (lm-eval draws its own progress bars), or an unknown name that api.evaluate rejects
        options = {
            "num_fewshot": args.num_fewshot,
            "limit": args.limit,
            "batch_size": args.batch_size or 8,
            "seed": args.seed,
            "include_path": args.lm_eval_include,
            "runtime": args.runtime,
        }
    result = api.evaluate(model, task, output=args.json, **options, **common)
    _print_json({k: v for k, v in result.items() if k != "samples"})


def add_demo(sub: Any) -> None:
    p = _verb(
        sub,
        "demo",
        help="the whole pipeline offline: train a teacher on the bundled math task, prune it, fine-tune with "
        "SquareHead, export bitmask int8 (or int4), benchmark the runtime; prints a table, writes OUTPUT/report.md",
    )
    p.add_argument("--output", "-o", default="runs/demo", help="where the demo writes its models and report")
    p.add_argument("--quick", action="store_true", help="the same pipeline at toy size (under a minute)")
    p.add_argument("--model", help="start from this model (hub id or directory) instead of a tiny one")
    p.add_argument(
        "--dataset",
        help="GSM8K-style question/answer data with train and test splits (with --model): a datasets name, or a "
        "directory holding train.jsonl and test.jsonl",
    )
    p.add_argument(
        "--quantize",
        choices=["int8", "int4"],
        default="int8",
        help="the exported archive's values: int8 (a scale per output channel) or int4 (a scale per 128 columns)",
    )
    _add_quiet(p)
    p.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> None:
    from sparseft.demo.pipeline import run_demo as demo

    demo(
        args.output,
        quick=args.quick,
        model=args.model,
        dataset=args.dataset,
        progress=not args.quiet,
        quantize=args.quantize,
    )


def add_finetune(sub: Any) -> None:
    p = _verb(sub, "finetune", "sparse fine-tune with the mask fixed, distilling from a teacher")
    p.add_argument("--model", help="student: hub id or local directory (usually a pruned checkpoint)")
    p.add_argument("--teacher", help="dense teacher (fine-tuned on the task); needed by --loss kd/squarehead")
    p.add_argument("--output", "-o", required=True, help="run directory; the final model is OUTPUT/model")
    p.add_argument("--recipe", help="YAML recipe (data, loss, train, stages); flags override it")
    # No argparse defaults below: a flag left out keeps the recipe's value, else FinetuneConfig's (the help says
    # it). `dest` names the recipe key ("train.lr"); `metavar` keeps it out of the help.
    p.add_argument(
        "--loss", help="ce (1 CE), kd (1 CE + 1 KD) or squarehead (1 CE + 1 SquareHead) (default: squarehead)"
    )
    p.add_argument(
        "--ce-weight",
        type=float,
        dest="loss.ce",
        metavar="W",
        help="weight of cross-entropy (default: by --loss)",
    )
    p.add_argument(
        "--kd-weight", type=float, dest="loss.kd", metavar="W", help="weight of KD (default: by --loss)"
    )
    p.add_argument(
        "--squarehead-weight",
        type=float,
        dest="loss.squarehead",
        metavar="W",
        help="weight of SquareHead (default: by --loss)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        dest="loss.temperature",
        metavar="T",
        help="KD temperature (default: 1.0)",
    )
    p.add_argument("--dataset", help="task data: .jsonl/.json/.csv/.parquet file or a datasets name")
    p.add_argument(
        "--dataset-config",
        dest="data.dataset_config",
        metavar="NAME",
        help="the datasets configuration, e.g. main",
    )
    p.add_argument(
        "--split", dest="data.split", metavar="SPLIT", help="the split to train on (default: train)"
    )
    data_format = p.add_argument(
        "--data-format",
        dest="data.format",
        choices=["qa", "chat", "text", "translation", "speech"],
        help="qa (GSM8K), chat, text; translation (T5) and speech (Whisper) for encoder-decoders (default: qa)",
    )
    _old_spelling(p, "--format", data_format)
    p.add_argument(
        "--question-field",
        dest="data.question_field",
        metavar="FIELD",
        help="qa: the question column (default: question)",
    )
    p.add_argument(
        "--answer-field",
        dest="data.answer_field",
        metavar="FIELD",
        help="qa: the answer column (default: answer)",
    )
    p.add_argument(
        "--prompt-field",
        dest="data.prompt_field",
        metavar="FIELD",
        help="chat: the prompt column (default: prompt)",
    )
    p.add_argument(
        "--response-field",
        dest="data.response_field",
        metavar="FIELD",
        help="chat: the response column (default: response)",
    )
    p.add_argument(
        "--text-field", dest="data.text_field", metavar="FIELD", help="text: the text column (default: text)"
    )
    _add_pair_fields(p, "data.")
    p.add_argument(
        "--seqlen",
        type=int,
        dest="data.seqlen",
        metavar="TOKENS",
        help="longest row in tokens (default: 512)",
    )
    p.add_argument(
        "--packing",
        action="store_const",
        const=True,
        dest="data.packing",
        help="pack whole examples into rows of --seqlen tokens (default: one example per row)",
    )
    p.add_argument(
        "--max-examples",
        type=int,
        dest="data.max_examples",
        metavar="N",
        help="use only the first N examples (default: all)",
    )
    p.add_argument(
        "--lr", type=float, dest="train.lr", metavar="LR", help="peak learning rate of AdamW (default: 1e-4)"
    )
    p.add_argument(
        "--epochs",
        type=float,
        dest="train.epochs",
        metavar="N",
        help="passes over the data, may be fractional (default: 1)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        dest="train.max_steps",
        metavar="N",
        help="optimizer steps; wins over --epochs (default: by --epochs)",
    )
    p.add_argument(
        "--micro-batch-size",
        type=int,
        dest="train.micro_batch_size",
        metavar="N",
        help="rows per forward pass (default: 8)",
    )
    p.add_argument(
        "--grad-accum",
        type=int,
        dest="train.grad_accum",
        metavar="N",
        help="micro-batches per optimizer step (default: 1)",
    )
    p.add_argument(
        "--warmup-steps",
        type=int,
        dest="train.warmup_steps",
        metavar="N",
        help="linear warmup, then linear decay (default: 20)",
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        dest="train.weight_decay",
        metavar="W",
        help="AdamW weight decay (default: 0.0)",
    )
    p.add_argument(
        "--max-grad-norm",
        type=float,
        dest="train.max_grad_norm",
        metavar="NORM",
        help="gradient clipping (default: 1.0)",
    )
    p.add_argument(
        "--bf16",
        action="store_const",
        const="bf16",
        dest="train.mixed_precision",
        help="bf16 autocast; weights and optimizer stay in --dtype (default: off)",
    )
    p.add_argument(
        "--seed",
        type=int,
        dest="train.seed",
        metavar="SEED",
        help="data order and other randomness of the run (default: 0)",
    )
    p.add_argument(
        "--save-every",
        type=int,
        dest="train.save_every",
        metavar="N",
        help="checkpoint every N steps (default: 100)",
    )
    p.add_argument(
        "--keep-last", type=int, dest="train.keep_last", metavar="N", help="checkpoints to keep (default: 2)"
    )
    p.add_argument(
        "--tensorboard",
        action="store_const",
        const=True,
        dest="train.tensorboard",
        help="log to OUTPUT/tensorboard (needs pip install tensorboard) (default: off)",
    )
    # Training keeps its master weights in float32 unless told otherwise (`--bf16` is autocast), so no auto here.
    p.add_argument("--dtype", help="weights' dtype while training: float32 or bfloat16 (default: float32)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUTPUT from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete OUTPUT and start again")
    _add_quiet(p)
    _add_trust_remote_code(p, keep_recipe=True)
    p.set_defaults(run=run_finetune)


def run_finetune(args: argparse.Namespace) -> None:
    from sparseft import api

    sections = {k.replace(".", "__"): v for k, v in vars(args).items() if "." in k}
    summary = api.finetune(
        args.model,
        args.output,
        teacher=args.teacher,
        dataset=args.dataset,
        recipe=args.recipe,
        loss=args.loss,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.quiet,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        **sections,
    )
    for stage in summary["stages"]:
        print(f"stage {stage['stage']}: {stage['steps']} steps, sparsity {stage['sparsity']:.2%}")
    print(f"model -> {summary['model']}; metrics.json and loss.png in {args.output}")


def add_export(sub: Any) -> None:
    p = _verb(sub, "export", "write a compact checkpoint: HF or bitmask archive, int8/int4")
    p.add_argument("model", help="hub id or local directory of a (pruned) Hugging Face checkpoint")
    p.add_argument("--output", "-o", required=True, help="directory for the export")
    p.add_argument(
        "--format",
        default="bitmask",
        choices=["hf", "bitmask"],
        help="checkpoint format (see docs/FORMAT.md)",
    )
    p.add_argument(
        "--quantize",
        choices=["int8", "int4"],
        help="int8: per output channel; int4: per group (default: none)",
    )
    p.add_argument("--group-size", type=int, metavar="N", help="input columns per int4 scale (default: 128)")
    quant_method = p.add_argument(
        "--quant-method",
        default="rtn",
        choices=["rtn", "gptq"],
        help="rounding: to nearest, or GPTQ (calibrated)",
    )
    _old_spelling(p, "--method", quant_method)
    p.add_argument("--dataset", help="GPTQ calibration text: a local file or a datasets name")
    p.add_argument(
        "--dataset-config", metavar="NAME", help="the datasets configuration, e.g. wikitext-2-raw-v1"
    )
    p.add_argument("--split", default="train", help="GPTQ: the split to calibrate on")
    p.add_argument("--text-field", default="text", metavar="FIELD", help="GPTQ: the text column")
    p.add_argument("--num-samples", type=int, default=128, metavar="N", help="GPTQ: calibration windows")
    p.add_argument(
        "--seqlen", type=int, default=2048, metavar="TOKENS", help="GPTQ: tokens per calibration window"
    )
    p.add_argument("--seed", type=int, default=0, help="GPTQ: picks the calibration windows")
    p.add_argument("--targets", help="comma-separated layers to compress (default: all linears in blocks)")
    p.add_argument("--ignore", help="comma-separated layers to leave dense")
    _add_dtype(p)
    _add_device(p, "compute device for GPTQ, one block at a time")
    _add_quiet(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    _add_trust_remote_code(p)
    p.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> None:
    from sparseft import api

    report = api.export(
        args.model,
        args.output,
        args.format,
        args.quantize,
        args.group_size,
        args.quant_method,
        dataset=args.dataset,
        dataset_config=args.dataset_config,
        split=args.split,
        text_field=args.text_field,
        num_samples=args.num_samples,
        seqlen=args.seqlen,
        seed=args.seed,
        targets=_list(args.targets),
        ignore=_list(args.ignore),
        dtype=None if args.dtype == "auto" else args.dtype,  # None: export's own "the checkpoint's dtype"
        device=_device(args.device),
        trust_remote_code=args.trust_remote_code,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    quant = report["quantization"]
    what = "" if quant is None else f" + int{quant['bits']} ({quant['method']})"
    errors = {k: v for k, v in report.items() if k.startswith("mean_")}
    detail = "".join(f", {k.removeprefix('mean_')} {v:.3g}" for k, v in errors.items())
    print(
        f"exported {len(report['layers'])} layers as {report['format']}{what}: "
        f"{report['size_on_disk'] / 1e6:.1f} MB{detail}, {report['seconds']} s -> {args.output}"
    )


def add_info(sub: Any) -> None:
    p = _verb(sub, "info", "describe an export: format, sparsity, bits, size, bytes per weight")
    p.add_argument("path", help="directory written by `sparseft export` (or any HF checkpoint)")
    p.add_argument("--json", action="store_true", help="print the full description as JSON")
    p.set_defaults(run=run_info)


def run_info(args: argparse.Namespace) -> None:
    from sparseft import api

    info = api.info(args.path)
    if args.json:
        _print_json(info)
        return
    print(f"{info['path']}: format {info['format']}, {info['size_on_disk'] / 1e6:.2f} MB on disk")
    print(f"{'layer':<48} {'shape':>12} {'sparsity':>9} {'bits':>5} {'bytes/weight':>13}")
    for name, layer in info["layers"].items():
        shape = f"{layer['rows']}x{layer['columns']}"
        sparsity, bits, per_weight = layer["sparsity"], layer["bits"], layer["bytes_per_weight"]
        print(f"{name:<48} {shape:>12} {sparsity:>9.2%} {bits!s:>5} {per_weight:>13.4f}")
    print(
        f"compressed layers: {info['layers_sparsity']:.2%} zeros, {info['layers_bytes_per_weight']:.4f} bytes per "
        f"weight ({info['layers_bytes'] / 1e6:.2f} MB); other tensors {info['other_bytes'] / 1e6:.2f} MB"
    )


def add_generate(sub: Any) -> None:
    p = _verb(sub, "generate", "generate text with the sparse CPU runtime")
    p.add_argument("model", help="a bitmask archive (sparseft export) or a pruned HF checkpoint")
    p.add_argument(
        "--prompt",
        help="text to continue (with --chat: the message to answer); left out, the whole of stdin is one prompt "
        "(its last line break dropped)",
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="answer the prompt as a user message through the tokenizer's chat template; with no --prompt at a "
        "terminal: a conversation, turn by turn (exit, quit or Ctrl-D leaves)",
    )
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate at most")
    _add_values(p)
    p.add_argument(
        "--head-values",
        choices=["bf16", "int8"],
        default="bf16",
        help="LM head in memory: bf16 (exact) or int8 (half its bytes, faster; logits change slightly)",
    )
    p.add_argument(
        "--sample",
        action="store_true",
        help="sample instead of greedy decoding (on with any of the next three)",
    )
    p.add_argument(
        "--temperature", type=float, metavar="T", help="sampling: divides the logits (default: 1.0)"
    )
    p.add_argument(
        "--top-p", type=float, metavar="P", help="sampling: from the likeliest tokens up to this probability"
    )
    p.add_argument("--top-k", type=int, metavar="K", help="sampling: from the k likeliest tokens")
    p.add_argument("--seed", type=int, help="sampling: the same seed gives the same text (default: random)")
    _add_threads(p)
    _add_quiet(p)
    p.add_argument(
        "--decoder",
        choices=["auto", "sparseft", "transformers"],
        default="auto",
        help="model code: sparseft's own decoder (Llama family), transformers' with sparse linears, or auto",
    )
    _add_trust_remote_code(p)
    p.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> None:
    from sparseft import api

    options: dict[str, Any] = dict(
        max_new_tokens=args.max_new_tokens, values=args.values, trust_remote_code=args.trust_remote_code,
        head_values=args.head_values, decoder=args.decoder, sample=args.sample, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, seed=args.seed, threads=args.threads, on_text=_print_piece,
    )  # fmt: skip
    if args.prompt is None and sys.stdin.isatty():
        if not args.chat:
            raise SparseftError(
                "give --prompt, pipe the prompt on stdin, or add --chat to chat at the terminal"
            )
        print("chat: type a message; exit, quit or Ctrl-D to leave", file=sys.stderr)
        try:
            for result in api.chat(args.model, _typed_turns(), **options):
                _print_stats(result)
        except KeyboardInterrupt:  # Ctrl-C leaves the chat, mid-reply too
            print()
        return
    prompt = args.prompt if args.prompt is not None else sys.stdin.read().removesuffix("\n")
    _print_stats(api.generate(args.model, prompt, chat=args.chat, **options))


def _print_piece(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _print_stats(result: dict[str, Any]) -> None:
    print()  # the streamed text ends its line
    print(
        f"[decoder: {result['decoder']}; {result['new_tokens']} tokens in {result['seconds']} s, "
        f"{result['tokens_per_s']} tok/s]",
        file=sys.stderr,
    )


def _typed_turns() -> Iterator[str]:
    """The messages typed at the terminal, until exit, quit or the end of input (Ctrl-D)."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input(); absent on Windows)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        if line.strip() in ("exit", "quit"):
            return
        if line.strip():
            yield line


def add_bench(sub: Any) -> None:
    p = _verb(
        sub,
        "bench",
        help="speed and memory, sparse CPU runtime vs dense bf16 side by side: prefill/decode tok/s; "
        "for T5 and Whisper encoder latency and decoder tok/s",
    )
    p.add_argument("model", help="a bitmask archive (sparseft export) or a pruned HF checkpoint")
    p.add_argument(
        "--prompt-tokens", type=int, default=128, metavar="N", help="decoder-only: tokens of the prompt"
    )
    p.add_argument("--new-tokens", type=int, default=64, metavar="N", help="new tokens (T5: per sentence)")
    p.add_argument(
        "--runs", type=int, default=3, metavar="N", help="alternating runs per model; medians are reported"
    )
    p.add_argument(
        "--sentences", type=int, default=32, metavar="N", help="T5: sentences translated one at a time"
    )
    p.add_argument(
        "--source-tokens", type=int, default=32, metavar="N", help="T5: tokens per source sentence"
    )
    p.add_argument(
        "--num-beams", type=int, metavar="N", help="encoder-decoder: beams (default: 5 for T5, 1 for Whisper)"
    )
    _add_values(p)
    p.add_argument(
        "--head-values", choices=["bf16", "int8"], default="bf16", help="the sparse model's LM head in memory"
    )
    json_file = p.add_argument("--json", metavar="FILE", help="also write the result as JSON to FILE")
    _old_spelling(p, "--output", json_file)
    _add_threads(p)
    _add_quiet(p)
    p.add_argument(
        "--decoder",
        choices=["auto", "sparseft", "transformers"],
        default="auto",
        help="model code: sparseft's own decoder (Llama family), transformers' with sparse linears, or auto",
    )
    _add_trust_remote_code(p)
    p.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> None:
    from sparseft import api

    if args.json:
        check_json_target(args.json)
    report = api.bench(
        args.model, args.prompt_tokens, args.new_tokens, args.runs, args.values, args.trust_remote_code,
        sentences=args.sentences, source_tokens=args.source_tokens, num_beams=args.num_beams,
        head_values=args.head_values, decoder=args.decoder,
    )  # fmt: skip
    if args.json:
        write_json(args.json, report)
    print(f"decoder: {report['decoder']}")
    results = dict(report["results"])
    machine = results.pop("_machine")
    if report["kind"] == "causal":
        print(
            f"{'model':<14} {'prefill tok/s':>14} {'decode tok/s':>13} {'memory MB':>10} {'bits/weight':>12}"
        )
        for name, row in results.items():
            print(
                f"{name:<14} {row['prefill_tok_s']:>14.1f} {row['decode_tok_s']:>13.1f} "
                f"{row['model_bytes'] / 1e6:>10.1f} {_bits(row):>12}"
            )
    else:
        print(
            f"{'model':<14} {'encoder ms':>11} {'decode tok/s':>13} {'job s':>8} {'memory MB':>10} {'peak MB':>8} "
            f"{'bits/weight':>12}"
        )
        for name, row in results.items():
            peak = f"{row['peak_bytes'] / 1e6:.1f}" if row["peak_bytes"] is not None else "n/a"
            print(
                f"{name:<14} {row['encoder_ms']:>11.1f} {row['decode_tok_s']:>13.1f} {row['job_s']:>8.2f} "
                f"{row['model_bytes'] / 1e6:>10.1f} {peak:>8} {_bits(row):>12}"
            )
    print(
        "bits/weight: read per weight of the linears at decode (mask, values and scales), the LM head aside"
    )
    print(
        f"{machine['threads']} threads, kernels {machine['kernels']}, copy bandwidth {machine['copy_gb_s']} GB/s, "
        f"clock {machine.get('clock_ghz') or 'n/a'} GHz"
    )


def _bits(row: dict[str, Any]) -> str:
    return "n/a" if row.get("bits_per_weight") is None else f"{row['bits_per_weight']:.2f}"


def add_serve(sub: Any) -> None:
    p = _verb(
        sub,
        "serve",
        help="an OpenAI-compatible HTTP server on the sparse CPU runtime, with continuous batching",
        description="Serve a Llama-family model (Llama, Mistral, Qwen2/3, Phi-3) on sparseft's own decoder: "
        "POST /v1/chat/completions and /v1/completions (streamed or whole), GET /v1/models, /health, /metrics. "
        "Requests join the running batch between decoding steps. SIGTERM or Ctrl-C stops taking requests, "
        "lets the running ones finish, and exits.",
    )
    p.add_argument("model", help="a bitmask archive (sparseft export) or a pruned HF checkpoint")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0 listens on every interface",
    )
    p.add_argument("--port", type=int, default=8000, metavar="N", help="port to listen on")
    _add_values(p)
    p.add_argument(
        "--head-values",
        choices=["bf16", "int8"],
        default="bf16",
        help="the LM head in memory",
    )
    _add_threads(p)
    _add_quiet(p)
    p.add_argument(
        "--max-batch",
        type=int,
        default=8,
        metavar="N",
        help="requests decoded together",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        metavar="N",
        help="requests waiting beyond those; more get 503",
    )
    p.add_argument(
        "--context",
        type=int,
        metavar="TOKENS",
        help="tokens per request, prompt and completion (default: the model's, up to 2048)",
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=256,
        metavar="TOKENS",
        help="prompt tokens prefilled between two decoding steps",
    )
    p.add_argument(
        "--api-key",
        metavar="KEY",
        help="ask every request for Authorization: Bearer KEY (default: $SPARSEFT_API_KEY)",
    )
    p.add_argument(
        "--model-name", metavar="NAME", help="the model's name in the API (default: the directory's name)"
    )
    _add_trust_remote_code(p)
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> None:
    from sparseft.serve import serve

    if not 0 < args.port < 65536:
        raise SparseftError(f"--port must be in 1..65535, got {args.port}")
    serve(
        args.model, args.host, args.port, api_key=args.api_key or os.environ.get("SPARSEFT_API_KEY"),
        name=args.model_name, values=args.values, head_values=args.head_values, max_batch=args.max_batch,
        max_queue=args.max_queue, context=args.context, prefill_chunk=args.prefill_chunk,
        trust_remote_code=args.trust_remote_code,
    )  # fmt: skip


# The verbs in `sparseft --help`, in the order of the pipeline.
COMMANDS: list[Callable[[Any], None]] = [
    add_prune,
    add_finetune,
    add_export,
    add_info,
    add_eval,
    add_generate,
    add_bench,
    add_serve,
    add_demo,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparseft", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"sparseft {_version()}")
    sub = parser.add_subparsers(title="verbs", dest="command", required=True, metavar="VERB")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    show = warnings.showwarning

    def show_ours(message: Warning | str, category: type[Warning], *rest: Any, **kwargs: Any) -> None:
        if issubclass(category, SparseftWarning):  # ours are meant for the user: one line, no source location
            print(f"sparseft: warning: {message}", file=sys.stderr)
        else:
            show(message, category, *rest, **kwargs)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_ours
            args = build_parser().parse_args(argv)  # here: an old flag's spelling warns while parsing
            with _threads(getattr(args, "threads", None)), _quiet(getattr(args, "quiet", False)):
                args.run(args)
    except SparseftError as e:
        print(f"sparseft: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the system refused a read or write: a full disk, a permission, a failing device
        where = f": {e.filename}" if e.filename else ""
        print(f"sparseft: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "sparseft: interrupted (outputs are written atomically; fine-tuning resumes with --resume)",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
