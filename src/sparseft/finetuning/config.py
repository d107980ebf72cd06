"""The settings of sparse fine-tuning (`sparseft finetune`, `sparseft.finetune`): a recipe of student, teacher,
task data, loss, training settings and stages, validated once where it enters, typed everywhere inside."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from sparseft.data.seq2seq import PairFields
from sparseft.data.tasks import DataConfig
from sparseft.errors import SparseftError
from sparseft.finetuning.losses import LOSS_PRESETS, LossWeights
from sparseft.pruning.config import PruneConfig
from sparseft.recipe import build, one_line, read_yaml, section


class LossConfig(BaseModel):
    """`name` picks the paper's weights (ce: 1 CE; kd: 1 CE + 1 KD; squarehead: 1 CE + 1 SquareHead); the
    explicit weights override them."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # inf or nan temperature or eps: refused

    name: str = "squarehead"
    ce: float | None = None
    kd: float | None = None
    squarehead: float | None = None
    temperature: float = 1.0
    eps: float = 1e-8

    @field_validator("name")
    @classmethod
    def _known_name(cls, value: str) -> str:
        if value not in LOSS_PRESETS:
            raise ValueError(f"unknown loss {value!r}; use one of {', '.join(LOSS_PRESETS)}")
        return value

    @field_validator("ce", "kd", "squarehead")
    @classmethod
    def _non_negative(cls, value: float | None) -> float | None:
        if value is not None and value < 0:
            raise ValueError(f"loss weights must be >= 0, got {value}")
        return value

    @field_validator("temperature", "eps")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError(f"must be positive, got {value}")
        return value

    @model_validator(mode="after")
    def _some_term(self) -> LossConfig:
        if not any(self._chosen().values()):
            raise ValueError(
                f"every loss weight is 0 ({self._chosen()}); give at least one term a positive weight"
            )
        return self

    def _chosen(self) -> dict[str, float]:
        preset = LOSS_PRESETS[self.name]
        return {
            k: preset[k] if getattr(self, k) is None else getattr(self, k) for k in ("ce", "kd", "squarehead")
        }

    def weights(self) -> LossWeights:
        """The `LossWeights` this section describes."""
        return LossWeights(**self._chosen(), temperature=self.temperature, eps=self.eps)


class TrainConfig(BaseModel):
    """Optimisation of one fine-tuning stage. The global batch is micro_batch_size x grad_accum x processes."""

    # allow_inf_nan=False: an inf or nan lr (or any other number here) is refused, not trained with.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    lr: float = 1e-4
    epochs: float = 1.0
    max_steps: int | None = None  # when set, wins over epochs
    micro_batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 20
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = 1.0
    mixed_precision: Literal["no", "bf16"] = "no"  # bf16 autocast; weights and optimizer stay in their dtype
    seed: int = 0
    save_every: int = 100
    keep_last: int = 2
    log_every: int = 1
    tensorboard: bool = False

    @field_validator("lr", "epochs")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError(f"must be positive, got {value}")
        return value

    @field_validator("max_steps", "micro_batch_size", "grad_accum", "save_every", "keep_last", "log_every")
    @classmethod
    def _at_least_one(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"must be at least 1, got {value}")
        return value

    @field_validator("warmup_steps", "weight_decay")
    @classmethod
    def _non_negative(cls, value: float) -> float:
        if value < 0:
            raise ValueError(f"must be >= 0, got {value}")
        return value

    @field_validator("betas")
    @classmethod
    def _betas_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        # AdamW refuses them too, but only when the optimizer is built: after the stage has pruned.
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(
                f"AdamW betas must each be in [0, 1), got {list(value)} (the paper: [0.9, 0.999])"
            )
        return value

    @field_validator("max_grad_norm")
    @classmethod
    def _clip_positive(cls, value: float | None) -> float | None:
        # torch clips by max_norm / norm: a negative one flips every gradient, zero stops learning.
        if value is not None and value <= 0:
            raise ValueError(f"must be positive, or null for no clipping, got {value}")
        return value


class StageConfig(BaseModel):
    """One stage: optionally prune (calibrated on the task data), then fine-tune with the mask fixed.
    A stage without `prune` only fine-tunes (how the dense teacher is made)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    prune: PruneConfig | None = None
    train: dict[str, Any] = {}  # overrides of the recipe's `train` section for this stage

    @field_validator("train", mode="before")
    @classmethod
    def _empty_train(cls, value: Any) -> Any:
        return {} if value is None else value  # `train:` with nothing under it

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not value or not all(c.isalnum() or c in "-_." for c in value):
            raise ValueError(f"stage name {value!r} must be letters, digits, '-', '_' or '.'")
        return value

    @field_validator("prune")
    @classmethod
    def _no_dataset(cls, value: PruneConfig | None) -> PruneConfig | None:
        # the calibration data are the task's: where they come from is the data section's to say
        source = {"dataset", "dataset_config", "split", "text_field", *PairFields.model_fields}
        given = sorted(source & (value.model_fields_set if value is not None else set()))
        if given:
            raise ValueError(
                f"a prune stage calibrates on the task data (the data section); drop its {', '.join(given)}"
            )
        return value


class FinetuneConfig(BaseModel):
    """A fine-tuning recipe: student, teacher, data, loss, default training settings, and the stages."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    teacher: str | None = None
    data: DataConfig
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    stages: list[StageConfig] = [StageConfig(name="finetune")]
    dtype: str = "float32"
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _stages_valid(self) -> FinetuneConfig:
        if not self.stages:
            raise ValueError("stages is empty; give at least one stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        for stage in self.stages:
            self.stage_train(stage)
        if self.teacher is None and self.loss.weights().needs_teacher:
            raise ValueError(
                f"loss {self.loss.name!r} distills from a teacher: pass --teacher (or use --loss ce)"
            )
        return self

    def stage_train(self, stage: StageConfig) -> TrainConfig:
        merged = {**self.train.model_dump(), **stage.train}
        try:
            return TrainConfig.model_validate(merged)
        except ValidationError as e:
            raise ValueError(one_line(e, f"train settings of stage {stage.name}")) from None


def finetune_config(recipe: str | Path | None = None, **overrides: Any) -> FinetuneConfig:
    """A FinetuneConfig from an optional YAML recipe plus overrides: top-level keys (model, teacher, dtype), and
    dotted section keys (`data.dataset`, `loss.name`, `train.lr`) for the sections."""
    data: dict[str, Any] = read_yaml(recipe) if recipe is not None else {}
    for name in ("data", "loss", "train"):
        if name in data:
            data[name] = section(data, name, str(recipe))
    for key, value in overrides.items():
        if value is None:
            continue
        part, _, field = key.partition(".")
        if field:
            if not isinstance(data.setdefault(part, {}), dict):
                raise SparseftError(f"recipe section {part!r} must be a mapping")
            data[part][field] = value
        else:
            data[key] = value
    if "data" not in data:
        raise SparseftError(
            "no task data: pass --dataset (a local file or a datasets name) or a recipe `data:`"
        )
    return build(FinetuneConfig, data, "fine-tuning settings")
