"""The settings of an export (`sparseft export`, `sparseft.export`): the format, the quantization of the target
linears and, for GPTQ, its calibration data; validated once where they enter, typed everywhere inside."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, model_validator

from sparseft.errors import SparseftError
from sparseft.quant.model import METHODS
from sparseft.quant.spec import QuantSpec, parse_quantize

EXPORT_FORMATS = ("hf", "bitmask")


class ExportConfig(BaseModel):
    """`format` "hf" (zeros kept; quantized: compressed-tensors pack-quantized) or "bitmask" (the compact archive,
    `sparseft.formats.bitmask`); `quantize` "int8" (per channel) or "int4" (per group of `group_size` columns) by
    `method` "rtn" or "gptq", the latter calibrated on `dataset` like pruning; `targets`/`ignore` choose the
    linears as pruning does (None: every linear in the blocks)."""

    model_config = ConfigDict(extra="forbid")

    format: str = "bitmask"
    quantize: str | None = None
    group_size: int | None = None
    method: str = "rtn"
    targets: list[str] | None = None
    ignore: list[str] | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    num_samples: int = 128
    seqlen: int = 2048
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> ExportConfig:
        if self.format not in EXPORT_FORMATS:
            raise ValueError(f"unknown export format {self.format!r}; use one of {', '.join(EXPORT_FORMATS)}")
        self.spec()  # an unknown scheme or a group size it does not take
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.method == "gptq" and self.quantize is None:
            raise ValueError("--quant-method gptq quantizes: pass --quantize int8 or int4 as well")
        if self.method == "gptq" and self.dataset is None:
            raise ValueError("GPTQ needs calibration data: pass --dataset (a local file or a datasets name)")
        if self.method == "gptq" and (self.num_samples < 1 or self.seqlen < 1):
            raise ValueError(
                f"GPTQ needs num_samples and seqlen of at least 1, got {self.num_samples} and {self.seqlen}"
            )
        return self

    def spec(self) -> QuantSpec | None:
        """The quantization scheme, or None for none."""
        try:
            return parse_quantize(self.quantize, self.group_size)
        except SparseftError as e:
            raise ValueError(str(e)) from None
