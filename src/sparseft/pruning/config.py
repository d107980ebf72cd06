"""The settings of one-shot pruning (`sparseft prune`, `sparseft.prune`, a fine-tuning recipe's prune stages):
validated once where they enter, typed everywhere inside."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, field_validator, model_validator

from sparseft.data.seq2seq import PairFields
from sparseft.errors import SparseftError
from sparseft.pruning.masks import NM, parse_structure
from sparseft.pruning.sequential import PruneSettings
from sparseft.recipe import build, read_yaml, section


class PruneConfig(PairFields):
    """One-shot pruning: which method, how sparse, which layers, and the calibration data (text for a causal
    LM; translation pairs or speech for an encoder-decoder, `sparseft.data.seq2seq.PairFields`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # a nan dampening: refused

    method: Literal["magnitude", "wanda", "sparsegpt"] = "sparsegpt"
    sparsity: float | None = None  # default 0.5, or N/M when `structure` is given
    structure: str | None = None  # "N:M" = N zeros in every M consecutive inputs
    targets: list[str] = []
    ignore: list[str] = []
    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    num_samples: int = 128
    seqlen: int = 2048
    seed: int = 0
    block_size: int = 128
    dampening: float = 0.01

    @field_validator("sparsity")
    @classmethod
    def _sparsity_range(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 <= value < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {value} (0.7 means 70% zeros)")
        return value

    @field_validator("num_samples", "seqlen", "block_size")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be at least 1, got {value}")
        return value

    @field_validator("dampening")
    @classmethod
    def _dampening_positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError(f"must be positive, got {value}")
        return value

    @model_validator(mode="after")
    def _structure_matches_sparsity(self) -> PruneConfig:
        nm = self.nm
        if nm is not None and self.sparsity is not None and abs(self.sparsity - nm.sparsity) > 1e-9:
            raise ValueError(
                f"structure {nm} is {nm.sparsity:.0%} sparse but sparsity is {self.sparsity}; drop one of them"
            )
        return self

    @property
    def nm(self) -> NM | None:
        try:
            return parse_structure(self.structure)
        except SparseftError as e:
            raise ValueError(str(e)) from None

    def settings(self) -> PruneSettings:
        nm = self.nm
        sparsity = nm.sparsity if nm is not None else (0.5 if self.sparsity is None else self.sparsity)
        return PruneSettings(self.method, sparsity, nm, self.block_size, self.dampening)


def prune_config(recipe: str | Path | None = None, **overrides: Any) -> PruneConfig:
    """A PruneConfig from an optional YAML recipe (its top level or its `prune:` section) plus overrides."""
    data: dict[str, Any] = {}
    if recipe is not None:
        loaded = read_yaml(recipe)
        if "prune" in loaded and len(loaded) > 1:
            others = ", ".join(k for k in loaded if k != "prune")
            raise SparseftError(
                f"recipe {recipe}: settings ({others}) sit at the top level beside the prune: section, which alone "
                "is read; indent them under prune:"
            )
        data.update(section(loaded, "prune", recipe) if "prune" in loaded else loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return build(PruneConfig, data, "pruning settings")
