"""Configuration schemas: validated once where they enter (CLI flags, YAML recipes), typed everywhere inside."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from sparseft.errors import SparseftError, first_line
from sparseft.pruning.masks import NM, parse_structure
from sparseft.pruning.sequential import PruneSettings


class PairFields(BaseModel):
    """Where encoder-decoder examples sit in a dataset (see `sparseft.seq2seq_data`): translation records
    `{"translation": {lang: text}}` or columns, chosen by language or by field name, with T5's task prefix
    (None: its own for the languages); speech audio in `audio_field`, its transcript in `text_field`."""

    source_lang: str | None = None
    target_lang: str | None = None
    source_field: str = "source"
    target_field: str = "target"
    source_prefix: str | None = None
    audio_field: str = "audio"


class PruneConfig(PairFields):
    """One-shot pruning: which method, how sparse, which layers, and the calibration data (text for a causal
    LM; translation pairs or speech for an encoder-decoder, `PairFields`)."""

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


def _one_line(error: ValidationError, what: str) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return f"invalid {what}: " + "; ".join(parts)


def build(schema: type[BaseModel], data: dict[str, Any], what: str) -> Any:
    """Validate `data` against `schema`, turning pydantic's report into one clear line."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise SparseftError(_one_line(e, what)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SparseftError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SparseftError(f"recipe {path} is not valid YAML: {first_line(e)}") from None
    if not isinstance(data, dict):
        raise SparseftError(f"recipe {path} must be a mapping of settings, got {type(data).__name__}")
    return data


def _section(recipe: dict[str, Any], name: str, path: str | Path) -> dict[str, Any]:
    """The mapping under `name`; an empty section (`prune:` with nothing under it) is YAML null, so no settings."""
    value = recipe.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SparseftError(
            f"recipe {path}: section {name!r} must be a mapping of settings, got {type(value).__name__}"
        )
    return value


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
        data.update(_section(loaded, "prune", recipe) if "prune" in loaded else loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return build(PruneConfig, data, "pruning settings")


# --- sparse fine-tuning (`sparseft finetune`) -------------------------------------------------------------------


class DataConfig(PairFields):
    """Task data for fine-tuning (and for calibrating the prune stages).

    format "qa": `prompt_template` filled from the record, loss on `answer_field` only (GSM8K: question/answer);
    "chat": `prompt_field` through the tokenizer's chat template, loss on `response_field` only;
    "text": causal LM on `text_field`, loss on every token;
    "translation" / "speech": encoder-decoder examples (T5, Whisper) from the `PairFields`, loss on the target.
    """

    model_config = ConfigDict(extra="forbid")

    dataset: str
    dataset_config: str | None = None
    split: str = "train"
    format: Literal["qa", "chat", "text", "translation", "speech"] = "qa"
    question_field: str = "question"
    answer_field: str = "answer"
    prompt_template: str = "Question: {question}\nAnswer: "
    prompt_field: str = "prompt"
    response_field: str = "response"
    text_field: str = "text"
    seqlen: int = 512
    packing: bool = False
    max_examples: int | None = None

    @field_validator("seqlen")
    @classmethod
    def _seqlen_positive(cls, value: int) -> int:
        if value < 2:
            raise ValueError(f"must be at least 2, got {value}")
        return value

    @field_validator("max_examples")
    @classmethod
    def _max_examples_positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"must be at least 1 (or unset for every record), got {value}")
        return value

    @model_validator(mode="after")
    def _template_fills_from_question(self) -> DataConfig:
        if self.format != "qa":
            return self
        # Fill it as `taskdata.prompt_and_response` will, with `question` alone, so that a stray field or brace
        # fails here and not as a KeyError after the data is loaded.
        marker = "\x00question\x00"
        try:
            filled = self.prompt_template.format(question=marker)
        except KeyError as e:
            raise ValueError(
                f"prompt_template {self.prompt_template!r} names {{{e.args[0]}}}, but only {{question}} is filled "
                "in; remove it (write a literal brace as {{ or }})"
            ) from None
        except (IndexError, ValueError, AttributeError) as e:
            raise ValueError(
                f"prompt_template {self.prompt_template!r} cannot be filled ({e}); use {{question}} for the "
                "question and write a literal brace as {{ or }}"
            ) from None
        if marker not in filled:
            raise ValueError(f"prompt_template {self.prompt_template!r} must contain {{question}}")
        return self


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
        from sparseft.distill import LOSS_PRESETS

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
        from sparseft.distill import LOSS_PRESETS

        preset = LOSS_PRESETS[self.name]
        return {
            k: preset[k] if getattr(self, k) is None else getattr(self, k) for k in ("ce", "kd", "squarehead")
        }

    def weights(self) -> Any:
        """The `sparseft.distill.LossWeights` this section describes."""
        from sparseft.distill import LossWeights

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
            raise ValueError(_one_line(e, f"train settings of stage {stage.name}")) from None


def finetune_config(recipe: str | Path | None = None, **overrides: Any) -> FinetuneConfig:
    """A FinetuneConfig from an optional YAML recipe plus overrides: top-level keys (model, teacher, dtype), and
    dotted section keys (`data.dataset`, `loss.name`, `train.lr`) for the sections."""
    data: dict[str, Any] = read_yaml(recipe) if recipe is not None else {}
    for name in ("data", "loss", "train"):
        if name in data:
            data[name] = _section(data, name, str(recipe))
    for key, value in overrides.items():
        if value is None:
            continue
        section, _, field = key.partition(".")
        if field:
            if not isinstance(data.setdefault(section, {}), dict):
                raise SparseftError(f"recipe section {section!r} must be a mapping")
            data[section][field] = value
        else:
            data[key] = value
    if "data" not in data:
        raise SparseftError(
            "no task data: pass --dataset (a local file or a datasets name) or a recipe `data:`"
        )
    return build(FinetuneConfig, data, "fine-tuning settings")
