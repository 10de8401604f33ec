"""Reading a run config: YAML recipe + dotted overrides -> a validated :class:`Config`.

``load_config("configs/x.yaml", ["model.depth=2", "train.steps=10"])`` (or ``load_config("x", ...)``,
the packaged recipe of that name) returns a validated
:class:`~pretrain.train.config.Config`. Every mistake (a file that is not a recipe, an unknown
key, a wrong type, a non-finite number, an impossible value) raises :class:`UserError` with one
line naming the key, the value and the fix. ``save_config`` writes the resolved config that goes
next to every run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import fields
from pathlib import Path

import yaml

from pretrain.core.errors import UserError
from pretrain.core.errors import config_error as _fail
from pretrain.core.files import write_atomic
from pretrain.train.config import Config
from pretrain.train.recipes import resolve_config


def _hint(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(options)}"


def _coerce(key: str, value, annotation):
    """Check (and gently convert) ``value`` to the field's declared type; floats must be finite."""
    value = _coerce_type(key, value, annotation)
    if isinstance(value, float) and not math.isfinite(value):
        _fail(key, value, "must be a finite number")
    return value


def _coerce_type(key: str, value, annotation):
    origin = typing.get_origin(annotation)
    options = typing.get_args(annotation) if origin in (typing.Union, types.UnionType) else (annotation,)
    if value is None:
        if type(None) in options:
            return None
        _fail(key, value, f"must not be null (expected {annotation})")
    for opt in options:
        if typing.get_origin(opt) is tuple:
            item = typing.get_args(opt)[0]
            if isinstance(value, (list, tuple)):
                return _coerce_items(key, value, item)
            if len(options) == 1 and not isinstance(value, dict) and not dataclasses.is_dataclass(item):
                return _coerce_items(key, [value], item)  # a single value for a list: shots=10
    for opt in options:
        if opt is type(None):
            continue
        if opt is bool and isinstance(value, bool):
            return value
        if opt is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if opt is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if opt is str and isinstance(value, str):
            return value
    if isinstance(value, str):  # YAML left e.g. "1e-3" as a string
        for opt in options:
            if opt in (int, float):
                try:
                    return opt(value)
                except ValueError:
                    pass
    names = " or ".join("null" if o is type(None) else _type_name(o) for o in options)
    _fail(key, value, f"expected {names}")


def _type_name(annotation) -> str:
    if typing.get_origin(annotation) is tuple:
        item = typing.get_args(annotation)[0]
        return f"a list of {'mappings' if dataclasses.is_dataclass(item) else item.__name__}"
    return annotation.__name__


def _coerce_items(key: str, values, item) -> tuple:
    """A YAML list for a ``tuple[item, ...]`` field: each element checked as ``item``; an element
    of a dataclass type is a mapping validated as that dataclass (e.g. ``fewshot.datasets``)."""
    if dataclasses.is_dataclass(item):
        return tuple(_section_from(item, f"{key}[{i}]", v) for i, v in enumerate(values))
    return tuple(_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(values))


def _section_from(cls, key: str, values: dict):
    """``cls`` built from the mapping ``values`` found at ``key`` ("" for the whole config, whose
    fields are the sections): every name known, every value coerced to its field's type."""
    if not isinstance(values, dict):
        _fail(key, values, "expected a mapping of keys")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    kwargs = {}
    for name, value in values.items():
        where = f"{key}.{name}" if key else name
        if name not in known:
            what = "key" if key else "section"
            raise UserError(f"config: unknown {what} {where}: {_hint(name, known)}")
        kwargs[name] = _coerce(where, value, hints[name]) if key else _section_from(hints[name], name, value or {})
    required = [f.name for f in fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in kwargs]
    if missing:
        raise UserError(f"config: {key} lacks {', '.join(missing)}: give each of {', '.join(required)}")
    return cls(**kwargs)


def config_from_dict(raw: dict) -> Config:
    """Build and validate a :class:`Config` from nested dicts (YAML content)."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise UserError("config: the file must hold a mapping of sections (run:, model:, train:, ...)")
    return _section_from(Config, "", raw)


def parse_override(text: str) -> tuple[list[str], object]:
    """``"model.depth=2"`` -> (["model", "depth"], 2); values are parsed as YAML scalars."""
    if "=" not in text:
        raise UserError(f"override {text!r}: write overrides as section.key=value, e.g. train.steps=100")
    path, _, value = text.partition("=")
    parts = path.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise UserError(f"override {text!r}: the key must be section.key, e.g. model.depth=2")
    try:
        return parts, yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0]
        raise UserError(f"override {text!r}: the value is not valid YAML ({first}); quote strings, e.g. "
                        f"{path}='...'") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = {k: dict(v or {}) for k, v in (raw or {}).items()}
    for text in overrides:
        (section, key), value = parse_override(text)
        raw.setdefault(section, {})[key] = value
    return raw


def read_yaml(path: str | Path) -> dict:
    """The sections of the recipe ``path`` names: a YAML file, or a packaged recipe's name
    (:func:`pretrain.train.recipes.resolve_config`, the one resolver of ``--config``)."""
    p = resolve_config(path)
    if p.is_dir():
        raise UserError(f"config file {str(p)!r} is a directory: pass --config with a YAML file or a recipe "
                        f"name, e.g. demo_cpu (`vitscale recipes` lists them)")
    if not p.is_file():
        raise UserError(f"config file {str(p)!r} does not exist: pass --config with a YAML file or a recipe "
                        f"name, e.g. demo_cpu (`vitscale recipes` lists them)")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = str(err).splitlines()[0]
        raise UserError(f"config file {str(p)!r} is not valid YAML ({first}): a recipe is YAML with sections "
                        f"run:, model:, train:, ... (see configs/)") from None
    if not isinstance(raw, dict) or not all(isinstance(v, dict) or v is None for v in raw.values()):
        raise UserError(f"config file {str(p)!r} is not a recipe: it must be a YAML mapping of sections (run:, "
                        f"model:, data:, train:, ...) each holding key: value pairs (see configs/)")
    return raw


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """YAML file (or defaults when None) + dotted overrides -> validated Config."""
    raw = read_yaml(path) if path else {}
    return config_from_dict(apply_overrides(raw, list(overrides)))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False), durable=False)
