"""The `sparseft` command line: parses flags, calls `sparseft.api`, prints. No logic of its own."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from sparseft.errors import SparseftError


def _list(text: str | None) -> list[str] | None:
    return [item.strip() for item in text.split(",") if item.strip()] if text else None


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def add_prune(sub: Any) -> None:
    p = sub.add_parser("prune", help="one-shot prune a causal LM (magnitude, wanda, sparsegpt)")
    p.add_argument("model", help="hub id or local directory of a Hugging Face causal LM")
    p.add_argument("--output", "-o", required=True, help="directory for the pruned checkpoint")
    p.add_argument("--recipe", help="YAML file with the same settings (flags override it)")
    p.add_argument("--method", choices=["magnitude", "wanda", "sparsegpt"])
    p.add_argument("--sparsity", type=float, help="fraction of zeros, e.g. 0.7 (default 0.5)")
    p.add_argument("--structure", help="N:M = N zeros in every M consecutive inputs, e.g. 2:4")
    p.add_argument("--targets", help="comma-separated module names, class names or re:regex (default: all linears in blocks)")
    p.add_argument("--ignore", help="comma-separated module names, class names or re:regex to leave dense")
    p.add_argument("--dataset", help="calibration text: a .txt/.jsonl/.json/.csv/.parquet file or a datasets name")
    p.add_argument("--dataset-config")
    p.add_argument("--split")
    p.add_argument("--text-field")
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
        num_samples=args.num_samples,
        seqlen=args.seqlen,
        seed=args.seed,
    )
    print(
        f"pruned {len(report['layers'])} layers with {report['method']} ({report['structure']}): "
        f"{report['targets_sparsity']:.2%} zeros in the targets, {report['seconds']} s -> {args.output}"
    )


def add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="evaluate a model: `sparseft eval ppl MODEL --dataset ...`")
    p.add_argument("task", choices=["ppl"], help="what to measure")
    p.add_argument("model", help="hub id or local directory")
    p.add_argument("--dataset", required=True)
    p.add_argument("--dataset-config")
    p.add_argument("--split", default="test")
    p.add_argument("--text-field", default="text")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", help="also write the result as JSON here")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> None:
    from sparseft import api
    from sparseft.atomic import write_json

    result = api.eval_ppl(
        args.model,
        args.dataset,
        dataset_config=args.dataset_config,
        split=args.split,
        text_field=args.text_field,
        seqlen=args.seqlen,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
    )
    if args.output:
        write_json(args.output, result)
    _print_json(result)


def add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the main job offline on the bundled default")
    p.add_argument("--output", "-o", default="runs/demo", help="where the demo writes its models and report")
    p.add_argument("--quick", action="store_true", help="a reduced run that finishes in seconds")
    p.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> None:
    from sparseft.demo import run_demo as demo

    demo(args.output, quick=args.quick)


# Each verb registers itself here; later verbs add a function to this list.
COMMANDS: list[Callable[[Any], None]] = [add_prune, add_eval, add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except SparseftError as e:
        print(f"sparseft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparseft: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
