"""The Hugging Face model card (`README.md`) that every output directory of prune, export and finetune gets.

The card says what the directory holds, computed from the files written into it, never from the arguments alone:
sparsity is measured from the saved weights (`sparseft.formats.describe`), what was done comes from the report the verb
wrote beside them (`sparsity.json`, `export.json`, `finetune.json`), and evaluation figures from `sparseft eval`
JSON files in the directory (none: no Evaluation section). The YAML front matter is what the Hub reads:
`base_model`, `library_name: sparseft`, `license` (carried from the source's own card, else left out),
`pipeline_tag` and `tags`.

History travels from card to card: the steps of a sparseft source card (between the STEPS markers) come first,
so an export of a pruned and fine-tuned model still says how it was pruned, and `base_model` stays the model
the chain started from. A source card that is not sparseft's (a Hub model's) gives only its license.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import hf_hub_download

from sparseft.formats.describe import describe
from sparseft.formats.load import load_config
from sparseft.hf import model_kind
from sparseft.io import write_text

CARD = "README.md"
LIBRARY = "sparseft"
# The reports the verbs write beside the weights: api.prune, api.export, finetuning.stages (its REPORT_FILE).
PRUNE_REPORT, EXPORT_REPORT, FINETUNE_REPORT = "sparsity.json", "export.json", "finetune.json"
PIPELINE_TAGS = {
    "causal": "text-generation",
    "translation": "text2text-generation",
    "speech": "automatic-speech-recognition",
}
LICENSE_KEYS = ("license", "license_name", "license_link")  # license "other" names itself in the other two
HISTORY_TAGS = ("pruned", "sparse-finetuned")  # what was done before this directory, carried from its source
# Our card's machine-read parts sit between HTML comments, which the Hub does not render.
STEPS = ("<!-- sparseft:steps -->", "<!-- /sparseft:steps -->")
EVALUATION = ("<!-- sparseft:evaluation -->", "<!-- /sparseft:evaluation -->")
METHODS = {"magnitude": "magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT"}
# The headline figures of each `sparseft eval` task (api.evaluate); lm-eval results carry their own names.
EVAL_METRICS = ("perplexity", "accuracy", "bleu", "wer")
CITATION = """\
@article{kurtic2023sparse,
  title={Sparse Fine-tuning for Inference Acceleration of Large Language Models},
  author={Kurtic, Eldar and Kuznedelev, Denis and Frantar, Elias and Goin, Michael and Alistarh, Dan},
  journal={arXiv preprint arXiv:2310.06927},
  year={2023}
}"""
_FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)^---[ \t]*\r?$\n?", re.DOTALL | re.MULTILINE)


@dataclass(frozen=True)
class Step:
    """One thing done to the weights: a line of the card (markdown) and the tags it earns."""

    text: str
    tags: tuple[str, ...] = ()


def write_card(
    directory: str | Path,
    source: str,
    output: str | Path,
    *,
    teacher: str | None = None,
    dataset: str | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Write the card of `directory` (a verb's output, usually still its temporary directory, after the weights and
    the report are in it) made from `source` (hub id or directory) and to be published at `output` (the path the
    run commands name). `teacher` and `dataset`: a fine-tuning stage's, which its report does not hold. Returns
    the front matter."""
    directory = Path(directory)
    meta, body = source_card(source)
    ours = meta.get("library_name") == LIBRARY
    kind = model_kind(load_config(str(directory), trust_remote_code))
    # a source without our card may still be a sparseft output (one made before cards): its reports tell
    before = carried_steps(body) if ours else report_steps(Path(source), kind)
    steps = before + report_steps(directory, kind, teacher, dataset)
    measured = _measure(directory)
    export = _read_json(directory / EXPORT_REPORT)
    tags = ["sparse"] if measured["sparsity"] > 0 else []
    carried: list[Any] = meta["tags"] if ours and isinstance(meta.get("tags"), list) else []
    tags += [t for t in HISTORY_TAGS if t in carried or any(t in s.tags for s in steps)]
    tags += _format_tags(export)
    front: dict[str, Any] = {"base_model": meta["base_model"] if ours and meta.get("base_model") else source}
    front["library_name"] = LIBRARY
    front |= {key: meta[key] for key in LICENSE_KEYS if meta.get(key)}
    front |= {"pipeline_tag": PIPELINE_TAGS[kind], "tags": tags}
    text = "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n\n"
    text += render_body(front, measured, steps, kind, export, str(output), evaluations(directory))
    write_text(directory / CARD, text)
    return front


def refresh_evaluation(directory: str | Path) -> bool:
    """Rewrite the Evaluation section of the sparseft card in `directory` from the eval JSON files there (after
    `sparseft eval --json DIR/NAME.json`); a directory without our card is left alone. True when rewritten."""
    path = Path(directory) / CARD
    if not path.is_file():
        return False
    text = path.read_text(encoding="utf-8")
    begin, end = EVALUATION
    if parse_front_matter(text).get("library_name") != LIBRARY or begin not in text or end not in text:
        return False
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    write_text(path, head + begin + "\n" + evaluation_section(evaluations(Path(directory))) + end + tail)
    return True


def parse_front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a model card ({} when it has none or it does not parse)."""
    found = _FRONT_MATTER.match(text)
    if found is None:
        return {}
    try:
        meta = yaml.safe_load(found.group(1))
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def source_card(source: str) -> tuple[dict[str, Any], str]:
    """The front matter and body of the source's README.md: a directory's own, else the Hub's (cached or
    fetched); ({}, "") when there is none."""
    path = Path(source)
    if path.is_dir():
        card = path / CARD
        text = card.read_text(encoding="utf-8", errors="replace") if card.is_file() else ""
    else:
        text = _hub_card(source)
    found = _FRONT_MATTER.match(text)
    return parse_front_matter(text), text[found.end() :] if found else text


def _hub_card(repo_id: str) -> str:
    try:
        return Path(hf_hub_download(repo_id, CARD)).read_text(encoding="utf-8", errors="replace")
    except Exception:  # offline, no such file, gated, not a hub name: the card only goes without the license
        return ""


def carried_steps(body: str) -> list[Step]:
    """The steps listed in a sparseft card's body, one per line."""
    begin, end = STEPS
    if begin not in body or end not in body:
        return []
    listed = body.split(begin, 1)[1].split(end, 1)[0]
    return [Step(line[2:].strip()) for line in listed.splitlines() if line.startswith("- ")]


def report_steps(
    directory: Path, kind: str, teacher: str | None = None, dataset: str | None = None
) -> list[Step]:
    """The steps told by the reports a verb wrote into `directory` (none for a directory not made by sparseft)."""
    steps: list[Step] = []
    prune, finetune, export = (
        _read_json(directory / name) for name in (PRUNE_REPORT, FINETUNE_REPORT, EXPORT_REPORT)
    )
    if prune:
        steps.append(prune_step(prune, kind))
    if finetune:
        steps += finetune_steps(finetune, kind, teacher, dataset)
    if export:
        steps.append(export_step(export))
    return steps


def prune_step(report: dict[str, Any], kind: str) -> Step:
    """A `sparseft prune` report (sparsity.json) as a step."""
    calibration = report.get("calibration")
    if calibration:
        data = f"calibrated on {_samples(calibration, kind)} from {_data(calibration)}"
    else:
        data = "no calibration data"
    text = f"**Pruned** one-shot with {_pruning(report)}, {data}."
    fused = report.get("dense_fused_weights")
    if fused:
        text += f" {len(fused)} mixture-of-experts weights stayed dense (not pruned)."
    return Step(text, ("pruned",))


def finetune_steps(report: dict[str, Any], kind: str, teacher: str | None, dataset: str | None) -> list[Step]:
    """A fine-tuning stage's report (finetune.json): its prune, if it had one, and its training."""
    steps = []
    data = f"`{dataset}`" if dataset else "the fine-tuning data"
    prune = report.get("prune")
    if prune:
        calibration = {"num_samples": prune.get("num_samples"), "seqlen": prune.get("seqlen")}
        text = f"**Pruned** one-shot with {_pruning(prune)}, calibrated on {_samples(calibration, kind)} of {data}"
        text += f" (seed {prune.get('seed', 0)})."
        steps.append(Step(text, ("pruned",)))
    sparsity = float(report.get("sparsity") or 0.0)
    train = report.get("train") or {}
    what = "Sparse fine-tuned" if sparsity > 0 else "Fine-tuned"
    text = f"**{what}** (stage `{report.get('stage')}`) for {report.get('steps')} steps"
    text += " with the pruning mask fixed" if sparsity > 0 else ""
    text += f", loss {_loss(report.get('loss_weights') or {})}"
    text += f", distilling from `{teacher}`" if teacher else ""
    text += f", on {data}"
    if train.get("lr") is not None:
        text += f", peak learning rate {train['lr']:g}"
    history = [h for h in report.get("history") or [] if "loss" in h]
    if history:
        text += f"; training loss {history[0]['loss']:.4g} at step {history[0].get('step', 1)}, "
        text += f"{history[-1]['loss']:.4g} at step {history[-1].get('step', len(history))}"
    steps.append(Step(text + ".", ("sparse-finetuned",) if sparsity > 0 else ()))
    return steps


def export_step(report: dict[str, Any]) -> Step:
    """A `sparseft export` report (export.json) as a step."""
    quant = report.get("quantization")
    if report.get("format") == "bitmask":
        text = "**Exported** as a sparseft bitmask archive (zeros not stored, one bit per weight marks the kept ones)"
    elif quant:
        text = "**Exported** as a Hugging Face checkpoint in compressed-tensors pack-quantized format (vLLM reads it)"
    else:
        text = "**Exported** as a Hugging Face checkpoint with the zeros kept"
    text += f", {report.get('dtype')} values" if not quant else ""
    if quant:
        grouping = (
            "per output channel" if quant.get("group_size") is None else f"in groups of {quant['group_size']}"
        )
        method = str(quant.get("method", "rtn")).upper()
        text += f"; weights quantized to int{quant.get('bits')} {grouping}, symmetric, by {method}"
        calibration = report.get("calibration")
        if calibration:
            text += f", calibrated on {_samples(calibration, 'causal')} from {_data(calibration)}"
    if report.get("size_on_disk"):
        text += f"; {report['size_on_disk'] / 2**20:.1f} MiB of weights on disk"
    return Step(text + ".")


def _pruning(settings: dict[str, Any]) -> str:
    method = METHODS.get(str(settings.get("method")), str(settings.get("method")))
    structure = settings.get("structure") or "unstructured"
    if structure != "unstructured":
        structure = f"{structure} structure (N zeros in every M consecutive inputs)"
    target = settings.get("sparsity")
    return f"{method}" + (f" to {target:.0%}" if target is not None else "") + f", {structure}"


def _samples(calibration: dict[str, Any], kind: str) -> str:
    # Text calibration is windows of seqlen tokens; encoder-decoders calibrate on whole examples.
    count = calibration.get("num_samples")
    if kind == "causal" and calibration.get("seqlen"):
        return f"{count} sequences of {calibration['seqlen']} tokens"
    return f"{count} examples"


def _data(calibration: dict[str, Any]) -> str:
    where = [str(calibration[k]) for k in ("config", "split") if calibration.get(k)]
    seed = f", seed {calibration['seed']}" if calibration.get("seed") is not None else ""
    return f"`{calibration.get('dataset')}`" + (f" ({', '.join(where)}{seed})" if where or seed else "")


def _loss(weights: dict[str, Any]) -> str:
    names = {"ce": "CE", "kd": "KD", "squarehead": "SquareHead"}
    terms = [f"{weights[k]:g}·{name}" for k, name in names.items() if weights.get(k)]
    text = " + ".join(terms) or "none"
    if weights.get("kd") and weights.get("temperature", 1.0) != 1.0:
        text += f" (KD temperature {weights['temperature']:g})"
    return text


def _format_tags(export: dict[str, Any] | None) -> list[str]:
    if not export:
        return []
    quant = export.get("quantization")
    tags = [f"int{quant['bits']}"] if quant else []
    if export.get("format") == "bitmask":
        tags.append("bitmask")
    elif quant:
        tags.append("compressed-tensors")
    return tags


def _measure(directory: Path) -> dict[str, Any]:
    """Sparsity of the saved weights: overall, per layer type and per part (attention, MLP)."""
    layers = describe(directory)["layers"]
    split_stacks = any("encoder" in n.split(".") for n in layers) and any(
        "decoder" in n.split(".") for n in layers
    )
    types: dict[str, dict[str, Any]] = {}
    parts: dict[str, list[float]] = {}
    for name, layer in layers.items():
        key, part = layer_type(name, split_stacks)
        weights = layer["rows"] * layer["columns"]
        zeros = layer["sparsity"] * weights
        entry = types.setdefault(key, {"part": part, "layers": 0, "weights": 0, "zeros": 0.0})
        entry["layers"] += 1
        entry["weights"] += weights
        entry["zeros"] += zeros
        total = parts.setdefault(part, [0.0, 0.0])
        total[0] += zeros
        total[1] += weights
    weights = sum(t["weights"] for t in types.values())
    zeros = sum(t["zeros"] for t in types.values())
    return {
        "layers": len(layers),
        "weights": weights,
        "sparsity": zeros / weights if weights else 0.0,
        "types": {k: {**v, "sparsity": v["zeros"] / v["weights"]} for k, v in types.items()},
        "parts": {k: z / w for k, (z, w) in parts.items()},
    }


def layer_type(name: str, split_stacks: bool = False) -> tuple[str, str]:
    """("self_attn.q_proj", "attention") for "model.layers.3.self_attn.q_proj.weight": the name without the
    block index, and whether it sits in attention or the MLP; `split_stacks` keeps "encoder"/"decoder" apart."""
    parts = name.removesuffix(".weight").split(".")
    block = max((i for i, p in enumerate(parts) if p.isdigit()), default=len(parts) - 3)
    key = ".".join(parts[block + 1 :])  # the name inside the block: "self_attn.q_proj", "fc1"
    if split_stacks:
        stack = next((p for p in parts if p in ("encoder", "decoder")), None)
        key = f"{stack} {key}" if stack else key
    attention = any("attn" in p.lower() or "attention" in p.lower() for p in parts)
    return key, "attention" if attention else "MLP"


def evaluations(directory: Path) -> list[tuple[str, dict[str, Any]]]:
    """(file name, result) of every `sparseft eval` JSON result in `directory` that evaluated this directory
    (its `model` is this directory, here or under the same name elsewhere): results of another model are not
    this one's."""
    found = []
    for path in sorted(directory.glob("*.json")):
        result = _read_json(path)
        if not result or not isinstance(result.get("task"), str) or not isinstance(result.get("model"), str):
            continue
        if not any(key in result for key in (*EVAL_METRICS, "results")):
            continue
        model = Path(result["model"])
        if model.name == directory.name or model.resolve() == directory.resolve():
            found.append((path.name, result))
    return found


def evaluation_section(results: list[tuple[str, dict[str, Any]]]) -> str:
    """The Evaluation section (empty without results, so that no card claims an evaluation that was not run)."""
    rows = []
    for file, result in results:
        # ppl keeps dataset, config and split at the top; the other tasks in a "dataset" object
        data = result.get("dataset")
        data = data if isinstance(data, dict) else result
        where = ", ".join(str(data[k]) for k in ("dataset", "config", "split") if data.get(k))
        protocol = result.get("protocol")  # bleu and wer keep `runtime` in their protocol
        runtime = result.get("runtime") or (isinstance(protocol, dict) and protocol.get("runtime"))
        kernels = "sparseft kernels" if runtime else "PyTorch"
        for metric, value in _figures(result):
            rows.append(
                f"| {result['task']} | {metric} | {value:.4g} | {where or '-'} | {kernels} | `{file}` |"
            )
    if not rows:
        return ""
    return "\n".join(
        [
            "## Evaluation",
            "",
            "Measured on this checkpoint with `sparseft eval` (the JSON files hold the full protocol).",
            "",
            "| Task | Metric | Value | Data | Ran on | Result file |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            "",
        ]
    )


def _figures(result: dict[str, Any]) -> list[tuple[str, float]]:
    figures = [(k, float(result[k])) for k in EVAL_METRICS if isinstance(result.get(k), int | float)]
    lm_eval = result.get("results")  # lm-eval: {task: {"acc,none": 0.5, "acc_stderr,none": 0.01, ...}}
    for task, metrics in (lm_eval if isinstance(lm_eval, dict) else {}).items():
        for name, value in (metrics if isinstance(metrics, dict) else {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool) and "stderr" not in name:
                figures.append((f"{task} {name.removesuffix(',none')}", float(value)))
    return figures


def render_body(
    front: dict[str, Any],
    measured: dict[str, Any],
    steps: list[Step],
    kind: str,
    export: dict[str, Any] | None,
    output: str,
    results: list[tuple[str, dict[str, Any]]],
) -> str:
    base = front["base_model"]
    name = Path(str(base[0] if isinstance(base, list) else base)).name or str(base)
    sparse = [f"{measured['sparsity']:.0%} sparse"] if measured["sparsity"] > 0 else []
    summary = sparse + [t for t in front["tags"] if t in ("int8", "int4")]
    title = f"# {name}" + (f": {', '.join(summary)}" if summary else "")
    lines = [
        title,
        "",
        f"Made with sparseft from `{base}` ({', '.join(front['tags']) or 'dense'}).",
        "",
        "## Sparsity",
        "",
    ]
    if measured["weights"]:
        lines += [
            f"Measured from the saved weights: {measured['sparsity']:.2%} of the {measured['weights']:,} weights "
            f"of the {measured['layers']} linear layers inside the transformer blocks are zero "
            f"({', '.join(f'{part} {s:.2%}' for part, s in measured['parts'].items())}). "
            "Embeddings, the output head and norms are not counted.",
            "",
            "| Layer type | Part | Layers | Weights | Sparsity |",
            "|---|---|---|---|---|",
            *(
                f"| {key} | {t['part']} | {t['layers']} | {t['weights']:,} | {t['sparsity']:.2%} |"
                for key, t in measured["types"].items()
            ),
        ]
    else:
        lines.append("No linear layers of transformer blocks were found to measure.")
    lines += ["", "## What was done", "", STEPS[0], *(f"- {s.text}" for s in steps), STEPS[1], ""]
    lines += ["## How to run", "", *_usage(kind, export, output), ""]
    lines += [EVALUATION[0], evaluation_section(results) + EVALUATION[1], ""]
    lines += ["## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


def _usage(kind: str, export: dict[str, Any] | None, output: str) -> list[str]:
    shell = []
    if kind == "causal":
        shell.append(f'sparseft generate {output} --prompt "Once upon a time"')
    elif kind == "translation":
        shell.append(
            f'sparseft generate {output} --prompt "translate English to German: The house is small."'
        )
    if kind == "causal":
        shell.append(f"sparseft serve {output}  # an OpenAI-compatible server on the sparse CPU runtime")
    lines = ["```bash", *shell, "```", ""] if shell else []
    lines += [
        "```python",
        "from sparseft import runtime",
        "",
        f'model = runtime.load("{output}")  # the pruned linears run on sparseft\'s sparse CPU kernels',
        "```",
        "",
    ]
    fmt = (export or {}).get("format", "hf")
    if fmt == "bitmask":
        lines.append(
            f"Only sparseft reads the bitmask archive; `sparseft export {output} --format hf --output DIR` "
            "writes a Hugging Face checkpoint with the zeros kept."
        )
    elif (export or {}).get("quantization"):
        lines.append(
            "vLLM serves this checkpoint; transformers reads it with the compressed-tensors package."
        )
    else:
        lines.append("It is a plain Hugging Face checkpoint too: transformers and vLLM load it as any other.")
    return lines


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
