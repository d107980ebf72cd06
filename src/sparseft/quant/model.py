"""Quantizing a model's target linears: round-to-nearest layer by layer, or GPTQ block by block through the same
sequential calibration driver as pruning (`sparseft.pruning.sequential`)."""

from __future__ import annotations

from typing import Any

import torch

from sparseft.errors import SparseftError
from sparseft.hf import weight_matrix
from sparseft.pruning.obs import Hessian
from sparseft.pruning.sequential import calibrate, run_sequential
from sparseft.quant.gptq import gptq_quantize
from sparseft.quant.spec import QuantizedWeight, QuantSpec, rtn_quantize


def relative_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor | None = None) -> float:
    """‖W − Ŵ‖²_F / ‖W‖²_F, or with a Hessian H = 2XXᵀ/n the output error tr(ΔHΔᵀ) / tr(WHWᵀ)."""
    w = weight.detach().to(torch.float32)
    delta = w - approx.detach().to(torch.float32)
    if hessian is None:
        num, den = delta.pow(2).sum(), w.pow(2).sum()
    else:
        h = hessian.to(torch.float32)
        num, den = ((delta @ h) * delta).sum(), ((w @ h) * w).sum()
    return float(num / den) if float(den) > 0 else 0.0


METHODS = ("rtn", "gptq")


def quantize_model(
    model: torch.nn.Module,
    targets: dict[str, torch.nn.Module],
    spec: QuantSpec,
    method: str = "rtn",
    samples: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[dict[str, QuantizedWeight], dict[str, dict[str, float]]]:
    """Quantize the `targets` of `model`, returning their integers and scales (on the CPU) and per-layer
    relative reconstruction errors. Each target's weight is replaced by its dequantized value, so the model in
    memory is exactly what loading the export gives back.

    GPTQ needs `samples` (num_samples, seqlen) token ids and runs through the same block-by-block driver as
    pruning, so each block is quantized from the outputs of the already quantized blocks before it. Its report
    holds RTN's errors beside its own: the weight error ‖ΔW‖²/‖W‖² and the output error tr(ΔHΔᵀ)/tr(WHWᵀ).
    """
    results: dict[str, QuantizedWeight] = {}
    errors: dict[str, dict[str, float]] = {}

    def store(name: str, weight: torch.Tensor, quantized: QuantizedWeight, approx: torch.Tensor) -> None:
        weight.copy_(
            approx
        )  # float32 q·s, rounded to the weight's dtype: the same as dequantize(weight.dtype)
        results[name] = QuantizedWeight(quantized.q.cpu(), quantized.scale.cpu(), spec)

    if method == "rtn":
        with torch.no_grad():
            for name, module in targets.items():
                weight = weight_matrix(module)
                quantized = rtn_quantize(weight, spec)
                approx = quantized.dequantize(torch.float32)
                errors[name] = {"rtn_weight_error": relative_error(weight, approx)}
                store(name, weight, quantized, approx)
        return results, errors
    if method != "gptq":
        raise SparseftError(f"unknown quantization method {method!r}; use one of {', '.join(METHODS)}")
    if samples is None:
        raise SparseftError("GPTQ needs calibration data: pass --dataset (a local file or a datasets name)")

    def quantize_group(modules: dict[str, torch.nn.Module], run: Any) -> None:
        stats = calibrate(modules, run, Hessian)
        for name, module in modules.items():
            weight = weight_matrix(module)
            accumulated = stats[name]
            assert isinstance(accumulated, Hessian)
            hessian = accumulated.matrix
            rtn = rtn_quantize(weight, spec).dequantize(torch.float32)
            quantized = gptq_quantize(weight, hessian, spec, weight.dtype, layer=name)
            gptq = quantized.dequantize(torch.float32)
            errors[name] = {
                "gptq_weight_error": relative_error(weight, gptq),
                "rtn_weight_error": relative_error(weight, rtn),
                "gptq_output_error": relative_error(weight, gptq, hessian),
                "rtn_output_error": relative_error(weight, rtn, hessian),
            }
            store(name, weight, quantized, gptq)

    run_sequential(model, targets, samples, quantize_group, device, progress, desc="gptq blocks")
    return results, errors
