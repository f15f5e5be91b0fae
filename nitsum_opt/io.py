"""YAML/JSON load and save for every API type, with errors that name the file, the field and the fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file that cannot be read or does not validate; the message says where and why."""


def read_document(path: str | Path) -> Any:
    """Parse a YAML or JSON file (by suffix; YAML otherwise) into plain Python data."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file}: no such file")
    text = file.read_text()
    if file.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{file}:{exc.lineno}:{exc.colno}: malformed JSON: {exc.msg}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(file)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: malformed YAML: {problem}") from None


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem: ``source: field.path: message (got value)``."""
    lines = [f"{source}: {exc.error_count()} problem(s) in {exc.title}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        got = err.get("input")
        got_text = "" if isinstance(got, dict | list) else f" (got {got!r})"
        lines.append(f"  {loc}: {err['msg']}{got_text}")
    return "\n".join(lines)


def validate_document(model_type: type[M], data: Any, source: str) -> M:
    """Validate plain data as ``model_type``; a failure becomes a :class:`ConfigError` naming each field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of {model_type.__name__} fields, got {type(data).__name__}")
    try:
        return model_type.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load(model_type: type[M], path: str | Path) -> M:
    """Load ``model_type`` from a YAML or JSON file."""
    return validate_document(model_type, read_document(path), str(path))


def dump_text(model: BaseModel, fmt: str = "yaml") -> str:
    """``model`` as YAML or JSON text."""
    data = model.model_dump(mode="json", exclude_defaults=False)
    if fmt == "json":
        return json.dumps(data, indent=2, sort_keys=False) + "\n"
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=False)
    raise ValueError(f"unknown format {fmt!r}; use 'yaml' or 'json'")


def save(model: BaseModel, path: str | Path) -> Path:
    """Write ``model`` to ``path`` (JSON for ``.json``, YAML otherwise)."""
    out = Path(path)
    out.write_text(dump_text(model, "json" if out.suffix == ".json" else "yaml"))
    return out
