"""The `sparseft` command line: parses flags, calls `sparseft.api`, prints. No logic of its own."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from sparseft.errors import SparseftError, SparseftWarning


def _list(text: str | None) -> list[str] | None:
    return [item.strip() for item in text.split(",") if item.strip()] if text else None


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


# Flags of encoder-decoder data (T5 translation, Whisper speech), with their help; see `sparseft.seq2seq_data`.
PAIR_FIELDS = {
    "source_lang": "translation: source language code in translation records (e.g. en)",
    "target_lang": "translation: target language code (e.g. de); speech: Whisper's language (e.g. hi)",
    "source_field": "translation: source column when not by language (default source)",
    "target_field": "translation: target column when not by language (default target)",
    "source_prefix": "translation: text before each source (default: T5's task prefix)",
    "audio_field": "speech: column of audio paths or datasets audio (default audio)",
}


def _add_pair_fields(p: argparse.ArgumentParser, section: str = "") -> None:
    """Add PAIR_FIELDS; `section` ("data.") files them under a recipe section."""
    for name, text in PAIR_FIELDS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=section + name, help=text)


def _pair_fields(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in PAIR_FIELDS}


def add_prune(sub: Any) -> None:
    p = sub.add_parser("prune", help="one-shot prune a causal LM, T5 or Whisper (magnitude/wanda/sparsegpt)")
    p.add_argument("model", help="hub id or local directory of a Hugging Face causal LM, T5 or Whisper")
    p.add_argument("--output", "-o", required=True, help="directory for the pruned checkpoint")
    p.add_argument("--recipe", help="YAML file with the same settings (flags override it)")
    p.add_argument("--method", choices=["magnitude", "wanda", "sparsegpt"])
    p.add_argument("--sparsity", type=float, help="fraction of zeros, e.g. 0.7 (default 0.5)")
    p.add_argument("--structure", help="N:M = N zeros in every M consecutive inputs, e.g. 2:4")
    p.add_argument(
        "--targets",
        help="comma-separated module names, class names or re:regex (default: all linears in blocks)",
    )
    p.add_argument("--ignore", help="comma-separated module names, class names or re:regex to leave dense")
    p.add_argument(
        "--dataset",
        help="calibration text (T5: translation pairs; Whisper: speech): a local file or a datasets name",
    )
    p.add_argument("--dataset-config")
    p.add_argument("--split")
    p.add_argument("--text-field", help="the text column (speech: the transcript column)")
    _add_pair_fields(p)
    p.add_argument("--num-samples", type=int)
    p.add_argument("--seqlen", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="cpu", help="compute device for one block at a time (cpu, cuda)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(run=run_prune)


def run_prune(args: argparse.Namespace) -> None:
    from sparseft import api

    report = api.prune(
        args.model,
        args.output,
        recipe=args.recipe,
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        overwrite=args.overwrite,
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
    p = sub.add_parser(
        "eval",
        help="evaluate a model: `sparseft eval MODEL --task gsm8k|ppl|lm-eval:NAME` (or `sparseft eval ppl MODEL`)",
    )
    p.add_argument(
        "positional", nargs="+", metavar="[TASK] MODEL", help="hub id or local directory (any export)"
    )
    p.add_argument(
        "--task", help="ppl, gsm8k, bleu (T5), wer (Whisper), or lm-eval:NAME[,NAME] (lm-evaluation-harness)"
    )
    p.add_argument("--lm-eval-tasks", help="comma-separated lm-eval tasks (same as --task lm-eval:NAMES)")
    p.add_argument(
        "--dataset",
        help="ppl: text; gsm8k: question/answer records (default: mathtask, the bundled generator's test split)",
    )
    p.add_argument("--dataset-config")
    p.add_argument("--split", default="test")
    p.add_argument("--text-field", default="text", help="ppl: the text column")
    p.add_argument("--seqlen", type=int, default=2048, help="ppl: window length")
    p.add_argument("--question-field", default="question", help="gsm8k: the question column")
    p.add_argument(
        "--answer-field", default="answer", help="gsm8k: the worked answer column (ends in #### N)"
    )
    p.add_argument("--fewshot-dataset", help="gsm8k: draw few-shot examples from this dataset's train split")
    p.add_argument("--num-fewshot", type=int, help="gsm8k: default 0; lm-eval: default the task's own")
    p.add_argument("--limit", type=int, help="evaluate only the first N examples")
    p.add_argument("--max-new-tokens", type=int, default=256, help="gsm8k: longest generated answer")
    p.add_argument("--seed", type=int, default=0, help="few-shot sampling and the bundled task's problems")
    p.add_argument("--lm-eval-include", help="lm-eval: a folder of extra task YAMLs (e.g. over local files)")
    _add_pair_fields(p)
    p.add_argument("--normalizer", default="basic", help="wer: Whisper's basic or english normaliser, none")
    p.add_argument("--num-beams", type=int, help="bleu/wer: beam search width (default 5 bleu, 1 wer)")
    p.add_argument("--batch-size", type=int, help="default 1 for ppl, 16 for bleu/wer, 8 otherwise")
    p.add_argument(
        "--runtime", action="store_true", help="run on sparseft's sparse CPU kernels (SparseLinear)"
    )
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", help="also write the result (with every gsm8k sample) as JSON here")
    p.add_argument("--trust-remote-code", action="store_true")
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
    common = {"dtype": args.dtype, "device": args.device, "trust_remote_code": args.trust_remote_code}
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
        }
    else:  # lm-eval:NAMES, or an unknown name that api.evaluate rejects
        options = {
            "num_fewshot": args.num_fewshot,
            "limit": args.limit,
            "batch_size": args.batch_size or 8,
            "seed": args.seed,
            "include_path": args.lm_eval_include,
            "runtime": args.runtime,
        }
    result = api.evaluate(model, task, output=args.output, **options, **common)
    _print_json({k: v for k, v in result.items() if k != "samples"})


def add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole pipeline offline: train a teacher on the bundled math task, prune 70%%, fine-tune with "
        "SquareHead, export bitmask int8, benchmark the runtime; prints a table, writes OUTPUT/report.md",
    )
    p.add_argument("--output", "-o", default="runs/demo", help="where the demo writes its models and report")
    p.add_argument("--quick", action="store_true", help="the same pipeline at toy size (under a minute)")
    p.add_argument("--model", help="start from this model (hub id or directory) instead of a tiny one")
    p.add_argument(
        "--dataset",
        help="GSM8K-style question/answer data with train and test splits (with --model): a datasets name, or a "
        "directory holding train.jsonl and test.jsonl",
    )
    p.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> None:
    from sparseft.demo import run_demo as demo

    demo(args.output, quick=args.quick, model=args.model, dataset=args.dataset)


def add_finetune(sub: Any) -> None:
    p = sub.add_parser("finetune", help="sparse fine-tune with the mask fixed, distilling from a teacher")
    p.add_argument("--model", help="student: hub id or local directory (usually a pruned checkpoint)")
    p.add_argument("--teacher", help="dense teacher (fine-tuned on the task); needed by --loss kd/squarehead")
    p.add_argument("--output", "-o", required=True, help="run directory; the final model is OUTPUT/model")
    p.add_argument("--recipe", help="YAML recipe (data, loss, train, stages); flags override it")
    p.add_argument("--loss", help="ce, kd (1 CE + 1 KD) or squarehead (1 CE + 1 SquareHead, the default)")
    p.add_argument("--ce-weight", type=float, dest="loss.ce")
    p.add_argument("--kd-weight", type=float, dest="loss.kd")
    p.add_argument("--squarehead-weight", type=float, dest="loss.squarehead")
    p.add_argument("--temperature", type=float, dest="loss.temperature", help="KD temperature (default 1)")
    p.add_argument("--dataset", help="task data: .jsonl/.json/.csv/.parquet file or a datasets name")
    p.add_argument("--dataset-config", dest="data.dataset_config")
    p.add_argument("--split", dest="data.split")
    p.add_argument(
        "--format",
        dest="data.format",
        choices=["qa", "chat", "text", "translation", "speech"],
        help="default qa (GSM8K); translation (T5) and speech (Whisper) for encoder-decoders",
    )
    p.add_argument("--question-field", dest="data.question_field")
    p.add_argument("--answer-field", dest="data.answer_field")
    p.add_argument("--prompt-field", dest="data.prompt_field")
    p.add_argument("--response-field", dest="data.response_field")
    p.add_argument("--text-field", dest="data.text_field")
    _add_pair_fields(p, "data.")
    p.add_argument("--seqlen", type=int, dest="data.seqlen", help="longest row in tokens (default 512)")
    p.add_argument("--packing", action="store_const", const=True, dest="data.packing")
    p.add_argument("--max-examples", type=int, dest="data.max_examples")
    p.add_argument("--lr", type=float, dest="train.lr")
    p.add_argument("--epochs", type=float, dest="train.epochs")
    p.add_argument("--max-steps", type=int, dest="train.max_steps")
    p.add_argument("--micro-batch-size", type=int, dest="train.micro_batch_size")
    p.add_argument("--grad-accum", type=int, dest="train.grad_accum")
    p.add_argument("--warmup-steps", type=int, dest="train.warmup_steps")
    p.add_argument("--weight-decay", type=float, dest="train.weight_decay")
    p.add_argument("--max-grad-norm", type=float, dest="train.max_grad_norm")
    p.add_argument("--bf16", action="store_const", const="bf16", dest="train.mixed_precision")
    p.add_argument("--seed", type=int, dest="train.seed")
    p.add_argument("--save-every", type=int, dest="train.save_every", help="checkpoint every N steps")
    p.add_argument("--keep-last", type=int, dest="train.keep_last", help="checkpoints to keep (default 2)")
    p.add_argument("--tensorboard", action="store_const", const=True, dest="train.tensorboard")
    p.add_argument("--dtype", help="weights' dtype: float32 (default) or bfloat16")
    p.add_argument("--resume", action="store_true", help="continue the run in OUTPUT from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete OUTPUT and start again")
    p.add_argument("--trust-remote-code", action="store_const", const=True)
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
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        **sections,
    )
    for stage in summary["stages"]:
        print(f"stage {stage['stage']}: {stage['steps']} steps, sparsity {stage['sparsity']:.2%}")
    print(f"model -> {summary['model']}; metrics.json and loss.png in {args.output}")


def add_export(sub: Any) -> None:
    p = sub.add_parser("export", help="write a compact checkpoint: HF or bitmask archive, int8/int4")
    p.add_argument("model", help="hub id or local directory of a (pruned) Hugging Face checkpoint")
    p.add_argument("--output", "-o", required=True, help="directory for the export")
    p.add_argument("--format", default="bitmask", choices=["hf", "bitmask"])
    p.add_argument("--quantize", choices=["int8", "int4"], help="int8: per output channel; int4: per group")
    p.add_argument("--group-size", type=int, help="input columns per int4 scale (default 128)")
    p.add_argument("--method", default="rtn", choices=["rtn", "gptq"], help="round to nearest, or GPTQ")
    p.add_argument("--dataset", help="GPTQ calibration text: a local file or a datasets name")
    p.add_argument("--dataset-config")
    p.add_argument("--split", default="train")
    p.add_argument("--text-field", default="text")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--targets", help="comma-separated layers to compress (default: all linears in blocks)")
    p.add_argument("--ignore", help="comma-separated layers to leave dense")
    p.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's own)")
    p.add_argument("--device", default="cpu", help="compute device for GPTQ, one block at a time")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> None:
    from sparseft import api

    report = api.export(
        args.model,
        args.output,
        args.format,
        args.quantize,
        args.group_size,
        args.method,
        dataset=args.dataset,
        dataset_config=args.dataset_config,
        split=args.split,
        text_field=args.text_field,
        num_samples=args.num_samples,
        seqlen=args.seqlen,
        seed=args.seed,
        targets=_list(args.targets),
        ignore=_list(args.ignore),
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        overwrite=args.overwrite,
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
    p = sub.add_parser("info", help="describe an export: format, sparsity, bits, size, bytes per weight")
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


# Each verb registers itself here; later verbs add a function to this list.
COMMANDS: list[Callable[[Any], None]] = [add_prune, add_eval, add_demo]
COMMANDS += [add_export, add_info]
COMMANDS += [add_finetune]


def add_generate(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate text with the sparse CPU runtime")
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
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--values", choices=["bf16", "int8"], help="weight values in memory (default: as exported)"
    )
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
    p.add_argument("--temperature", type=float, help="sampling: divides the logits (default 1.0)")
    p.add_argument("--top-p", type=float, help="sampling: from the likeliest tokens up to this probability")
    p.add_argument("--top-k", type=int, help="sampling: from the k likeliest tokens")
    p.add_argument("--seed", type=int, help="sampling: the same seed gives the same text")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's, one per core)")
    p.add_argument(
        "--decoder",
        choices=["auto", "sparseft", "transformers"],
        default="auto",
        help="model code: sparseft's own decoder (Llama family), transformers' with sparse linears, or auto",
    )
    p.add_argument("--trust-remote-code", action="store_true")
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
    p = sub.add_parser(
        "bench",
        help="speed and memory, sparse CPU runtime vs dense bf16 side by side: prefill/decode tok/s; "
        "for T5 and Whisper encoder latency and decoder tok/s",
    )
    p.add_argument("model", help="a bitmask archive (sparseft export) or a pruned HF checkpoint")
    p.add_argument("--prompt-tokens", type=int, default=128, help="decoder-only: tokens of the prompt")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens (T5: per sentence)")
    p.add_argument("--runs", type=int, default=3, help="alternating runs per model; medians are reported")
    p.add_argument("--sentences", type=int, default=32, help="T5: sentences translated one at a time")
    p.add_argument("--source-tokens", type=int, default=32, help="T5: tokens per source sentence")
    p.add_argument("--num-beams", type=int, help="encoder-decoder: beams (default: 5 for T5, 1 for Whisper)")
    p.add_argument(
        "--values", choices=["bf16", "int8"], help="weight values in memory (default: as exported)"
    )
    p.add_argument(
        "--head-values", choices=["bf16", "int8"], default="bf16", help="the sparse model's LM head in memory"
    )
    p.add_argument("--output", help="also write the result as JSON here")
    p.add_argument(
        "--decoder",
        choices=["auto", "sparseft", "transformers"],
        default="auto",
        help="model code: sparseft's own decoder (Llama family), transformers' with sparse linears, or auto",
    )
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> None:
    from sparseft import api
    from sparseft.atomic import check_json_target, write_json

    if args.output:
        check_json_target(args.output)
    report = api.bench(
        args.model, args.prompt_tokens, args.new_tokens, args.runs, args.values, args.trust_remote_code,
        sentences=args.sentences, source_tokens=args.source_tokens, num_beams=args.num_beams,
        head_values=args.head_values, decoder=args.decoder,
    )  # fmt: skip
    if args.output:
        write_json(args.output, report)
    print(f"decoder: {report['decoder']}")
    results = dict(report["results"])
    machine = results.pop("_machine")
    if report["kind"] == "causal":
        print(f"{'model':<14} {'prefill tok/s':>14} {'decode tok/s':>13} {'memory MB':>10}")
        for name, row in results.items():
            print(
                f"{name:<14} {row['prefill_tok_s']:>14.1f} {row['decode_tok_s']:>13.1f} {row['model_bytes'] / 1e6:>10.1f}"
            )
    else:
        print(
            f"{'model':<14} {'encoder ms':>11} {'decode tok/s':>13} {'job s':>8} {'memory MB':>10} {'peak MB':>8}"
        )
        for name, row in results.items():
            peak = f"{row['peak_bytes'] / 1e6:.1f}" if row["peak_bytes"] is not None else "n/a"
            print(
                f"{name:<14} {row['encoder_ms']:>11.1f} {row['decode_tok_s']:>13.1f} {row['job_s']:>8.2f} "
                f"{row['model_bytes'] / 1e6:>10.1f} {peak:>8}"
            )
    print(
        f"{machine['threads']} threads, kernels {machine['kernels']}, copy bandwidth {machine['copy_gb_s']} GB/s, "
        f"clock {machine.get('clock_ghz') or 'n/a'} GHz"
    )


COMMANDS += [add_generate, add_bench]


def add_serve(sub: Any) -> None:
    p = sub.add_parser(
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
        help="address to listen on (default: %(default)s; 0.0.0.0 listens on every interface)",
    )
    p.add_argument("--port", type=int, default=8000, metavar="N", help="(default: %(default)s)")
    p.add_argument(
        "--values", choices=["bf16", "int8"], help="weight values in memory (default: as exported)"
    )
    p.add_argument(
        "--head-values",
        choices=["bf16", "int8"],
        default="bf16",
        help="the LM head in memory (default: %(default)s)",
    )
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for the model (default: torch's)")
    p.add_argument(
        "--max-batch",
        type=int,
        default=8,
        metavar="N",
        help="requests decoded together (default: %(default)s)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        metavar="N",
        help="requests waiting beyond those; more get 503 (default: %(default)s)",
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
        help="prompt tokens prefilled between two decoding steps (default: %(default)s)",
    )
    p.add_argument(
        "--api-key",
        metavar="KEY",
        help="ask every request for Authorization: Bearer KEY (default: $SPARSEFT_API_KEY)",
    )
    p.add_argument(
        "--model-name", metavar="NAME", help="the model's name in the API (default: the directory's name)"
    )
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> None:
    import os

    import torch

    from sparseft.serve import serve

    if args.threads is not None:
        if args.threads < 1:
            raise SparseftError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if not 0 < args.port < 65536:
        raise SparseftError(f"--port must be in 1..65535, got {args.port}")
    serve(
        args.model, args.host, args.port, api_key=args.api_key or os.environ.get("SPARSEFT_API_KEY"),
        name=args.model_name, values=args.values, head_values=args.head_values, max_batch=args.max_batch,
        max_queue=args.max_queue, context=args.context, prefill_chunk=args.prefill_chunk,
        trust_remote_code=args.trust_remote_code,
    )  # fmt: skip


COMMANDS += [add_serve]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    show = warnings.showwarning

    def show_ours(message: Warning | str, category: type[Warning], *rest: Any, **kwargs: Any) -> None:
        if issubclass(category, SparseftWarning):  # ours are meant for the user: one line, no source location
            print(f"sparseft: warning: {message}", file=sys.stderr)
        else:
            show(message, category, *rest, **kwargs)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_ours
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
