"""The toy models by name: what `mechscope toy train|analyze NAME` and `mechscope.toys.get_toy` find.

Each toy's module defines `TOY`, a `Toy` saying how to train, load and analyse it; the registry
imports a module only when its toy is asked for."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from typing import Any, Callable

from .training import ToyError

MODULES = {
    "superposition": "mechscope.toys.superposition",
    "modular-addition": "mechscope.toys.modular_addition",
    "induction": "mechscope.toys.induction",
    "max-of-k": "mechscope.toys.max_of_k",
}


@dataclass(frozen=True)
class Toy:
    """How to use one toy.

    * `config`: its config dataclass (the paper's defaults; `seed` and `steps` among the fields);
    * `train(config, out=None, device=None, progress=True, resume=False)`: train, checkpointing into
      `out`; returns the trained toy (any object `analyze` takes);
    * `load(path, device=None)`: the trained toy back from a checkpoint directory;
    * `analyze(trained, progress=True)`: the analysis, an object with `summary` (JSON-ready dict),
      `sections()` (report sections) and `files()` ({file name: writer(path)}, figures and data)."""

    name: str
    description: str
    config: type
    train: Callable[..., Any]
    load: Callable[..., Any]
    analyze: Callable[..., Any]


def toy_names() -> list[str]:
    return list(MODULES)


def get_toy(name: str) -> Toy:
    if name not in MODULES:
        raise ToyError(f"unknown toy {name!r}; known: {', '.join(MODULES)}")
    return importlib.import_module(MODULES[name]).TOY


def parse_overrides(config_cls, pairs: list[str] | tuple[str, ...], base: dict | None = None):
    """`config_cls` from `base` updated with `key=value` strings, each value parsed as its field's type
    (int, float, bool, str, or a comma-separated tuple of numbers)."""
    known = {f.name: f for f in fields(config_cls)}
    values = dict(base or {})
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ToyError(f"--set {pair!r}: expected KEY=VALUE")
        if key not in known:
            raise ToyError(f"--set {pair!r}: {config_cls.__name__} has no field '{key}'; fields: {', '.join(known)}")
        default = getattr(config_cls, key, None)
        values[key] = _parse(raw.strip(), default, pair)
    try:
        return config_cls(**values)
    except ToyError:
        raise  # the config's own message names its class and field
    except (TypeError, ValueError) as exc:
        raise ToyError(f"{config_cls.__name__}: {exc}") from None


def _parse(raw: str, default, pair: str):
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, tuple):
            items = [x.strip() for x in raw.split(",") if x.strip()]
            kind = type(default[0]) if default else float
            return tuple(kind(x) for x in items)
    except ValueError:
        raise ToyError(f"--set {pair!r}: {raw!r} is not a valid {type(default).__name__}") from None
    return raw
