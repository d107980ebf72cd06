"""YAML recipes and settings: read once where they enter (CLI flags, a recipe file), validated by the schemas of
`sparseft.pruning.config` and `sparseft.finetuning.config`, each mistake reported as one clear line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from sparseft.errors import SparseftError, first_line


def one_line(error: ValidationError, what: str) -> str:
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
        raise SparseftError(one_line(e, what)) from None


def merge(schema: type[BaseModel], config: BaseModel | None, overrides: dict[str, Any], what: str) -> Any:
    """The settings of `config` (those it was given) with the `overrides` that are not None on top, validated
    against `schema` as `build` does: how a verb takes a config, keyword arguments, or both."""
    given = config.model_dump(exclude_unset=True) if config is not None else {}
    return build(schema, {**given, **{k: v for k, v in overrides.items() if v is not None}}, what)


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


def section(recipe: dict[str, Any], name: str, path: str | Path) -> dict[str, Any]:
    """The mapping under `name`; an empty section (`prune:` with nothing under it) is YAML null, so no settings."""
    value = recipe.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SparseftError(
            f"recipe {path}: section {name!r} must be a mapping of settings, got {type(value).__name__}"
        )
    return value
