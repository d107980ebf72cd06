from pathlib import Path

import pytest
import yaml

from sparseft.errors import SparseftError
from sparseft.finetuning.config import FinetuneConfig, finetune_config
from sparseft.finetuning.losses import LossWeights
from sparseft.pruning.config import prune_config
from sparseft.recipe import build, read_yaml

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))


def _is_accelerate_config(path: Path) -> bool:
    return path.name.startswith("fsdp")


@pytest.mark.parametrize("path", [p for p in RECIPES if not _is_accelerate_config(p)], ids=lambda p: p.name)
def test_every_recipe_validates(path):
    data = read_yaml(path)
    if "data" in data or "stages" in data:
        cfg = build(FinetuneConfig, data, f"recipe {path.name}")
        for stage in cfg.stages:
            cfg.stage_train(stage)
            if stage.prune is not None:
                stage.prune.settings()
    else:
        prune_config(path)


def test_paper_recipes_carry_the_paper_hyper_parameters():
    expected = {  # the paper's MPT-7B GSM8K schedule: sparsity -> (lr, epochs)
        "40": (0.4, 3e-5, 2), "50": (0.5, 3e-5, 2), "60": (0.6, 1e-4, 2), "70": (0.7, 8e-5, 4),
        "80": (0.8, 1e-4, 4), "2of4": (0.5, 1e-4, 4),
    }  # fmt: skip
    for name, (sparsity, lr, epochs) in expected.items():
        cfg = build(FinetuneConfig, read_yaml(RECIPES[0].parent / f"mpt7b_gsm8k_{name}.yaml"), name)
        (stage,) = cfg.stages
        train = cfg.stage_train(stage)
        assert (train.lr, train.epochs, train.warmup_steps, train.weight_decay) == (lr, epochs, 20, 0.0)
        assert train.micro_batch_size * train.grad_accum * 8 == 32 and train.mixed_precision == "bf16"
        assert stage.prune is not None and stage.prune.settings().sparsity == pytest.approx(sparsity)
        assert cfg.loss.weights() == LossWeights(ce=1.0, squarehead=1.0, eps=0.0078125)
        assert cfg.data.seqlen == 512 and cfg.data.format == "qa"


@pytest.mark.parametrize("path", [p for p in RECIPES if _is_accelerate_config(p)], ids=lambda p: p.name)
def test_fsdp_config_is_an_accelerate_fsdp_config(path):
    data = yaml.safe_load(path.read_text())
    assert data["distributed_type"] == "FSDP" and data["fsdp_config"]["fsdp_version"] == 2
    assert data["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # checkpoints gather full weights


def test_stage_overrides_merge_and_are_validated():
    data = {
        "teacher": "t",
        "data": {"dataset": "d.jsonl"},
        "train": {"lr": 1e-3, "micro_batch_size": 4},
        "stages": [{"name": "a", "train": {"lr": 5e-4}}, {"name": "b", "train": {"grad_accum": 0}}],
    }
    with pytest.raises(SparseftError, match="stage b.*grad_accum"):
        build(FinetuneConfig, data, "recipe")
    data["stages"][1]["train"] = {}
    cfg = build(FinetuneConfig, data, "recipe")
    assert [cfg.stage_train(s).lr for s in cfg.stages] == [5e-4, 1e-3]
    assert cfg.stage_train(cfg.stages[0]).micro_batch_size == 4


def test_a_prune_stage_takes_its_calibration_data_from_the_data_section():
    data = {
        "teacher": "t",
        "data": {"dataset": "d.jsonl"},
        "stages": [{"name": "s", "prune": {"sparsity": 0.5}}],
    }
    assert build(FinetuneConfig, data, "recipe").stages[0].prune.sparsity == 0.5
    for field, value in [
        ("split", "test"),
        ("text_field", "body"),
        ("source_lang", "de"),
        ("dataset", "x.txt"),
    ]:
        data["stages"][0]["prune"] = {"sparsity": 0.5, field: value}  # silently unused before
        with pytest.raises(SparseftError, match=f"calibrates on the task data .*drop its {field}"):
            build(FinetuneConfig, data, "recipe")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loss.name": "mse"}, "unknown loss 'mse'"),
        ({"loss.kd": -0.5}, "loss weights must be >= 0"),
        ({"loss.name": "kd", "teacher": None}, "distills from a teacher"),
        ({"loss.name": "ce", "loss.ce": 0.0}, "every loss weight is 0"),
        ({"train.lr": 0}, "train.lr: must be positive"),
        ({"data.format": "qa", "data.prompt_template": "Q:"}, "must contain {question}"),
        ({"data.prompt_template": "Q {{question}}"}, "must contain {question}"),  # literal braces, no field
        (
            {"data.prompt_template": "Q {question} {context}"},
            "names {context}, but only {question} is filled",
        ),
        ({"data.prompt_template": "Q {question} {}"}, "cannot be filled"),
        ({"data.prompt_template": "Q {question"}, "cannot be filled"),
        ({"data.max_examples": 0}, "data.max_examples: must be at least 1"),
        ({"data.max_examples": -3}, "data.max_examples: must be at least 1"),
        ({"train.max_grad_norm": -1.0}, "train.max_grad_norm: must be positive, or null"),
        ({"train.max_grad_norm": 0.0}, "train.max_grad_norm: must be positive, or null"),
        ({"train.betas": (0.9, 1.0)}, r"betas must each be in \[0, 1\)"),
        ({"train.betas": (-0.1, 0.999)}, r"betas must each be in \[0, 1\)"),
        ({"train.betas": (float("nan"), 0.999)}, "train.betas.0: Input should be a finite number"),
        ({"train.lr": float("nan")}, "train.lr: Input should be a finite number"),
        ({"train.lr": float("inf")}, "train.lr: Input should be a finite number"),
        ({"loss.temperature": float("inf")}, "loss.temperature: Input should be a finite number"),
        ({"loss.eps": float("nan")}, "loss.eps: Input should be a finite number"),
    ],
)
def test_bad_finetune_settings_are_one_line_errors(overrides, message):
    args = {"teacher": "t", "data.dataset": "d.jsonl", **overrides}
    with pytest.raises(SparseftError, match=message) as info:
        finetune_config(**{k: v for k, v in args.items() if v is not None})
    assert "\n" not in str(info.value)


def test_loss_presets_and_explicit_weights():
    cfg = finetune_config(**{"data.dataset": "d.jsonl", "teacher": "t", "loss.name": "kd", "loss.kd": 0.5})
    assert cfg.loss.weights() == LossWeights(ce=1.0, kd=0.5, squarehead=0.0)
    assert finetune_config(**{"data.dataset": "d.jsonl", "loss.name": "ce"}).loss.weights() == LossWeights()


def test_good_templates_and_clipping_still_validate():
    cfg = finetune_config(
        **{"data.dataset": "d.jsonl", "loss.name": "ce", "data.prompt_template": "{{Q}} {question!s}:"}
    )
    assert cfg.data.prompt_template.format(question="x") == "{Q} x:"
    assert (
        build(
            FinetuneConfig,
            {"data": {"dataset": "d"}, "loss": {"name": "ce"}, "train": {"max_grad_norm": None}},
            "r",
        ).train.max_grad_norm
        is None
    )


def test_empty_finetune_sections_read_as_no_settings(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m\ndata:\nloss:\ntrain:\nstages:\n  - name: a\n    train:\n")
    cfg = finetune_config(recipe, **{"data.dataset": "d.jsonl", "loss.name": "ce"})
    assert cfg.data.dataset == "d.jsonl" and cfg.train.lr == 1e-4 and cfg.stages[0].train == {}


def test_a_section_that_is_not_a_mapping_is_one_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("prune: [1, 2]\n")
    with pytest.raises(SparseftError, match="section 'prune' must be a mapping of settings, got list"):
        prune_config(recipe)
    recipe.write_text("data: d.jsonl\n")
    with pytest.raises(SparseftError, match="section 'data' must be a mapping of settings, got str"):
        finetune_config(recipe)
