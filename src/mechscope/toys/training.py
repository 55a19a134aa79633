"""Seeded training of the toy models, with progress and checkpoints that survive an interrupt.

A toy's checkpoint is a directory:

* `model.safetensors` — the parameters (`state_dict`, on the host);
* `optimizer.pt` — the optimiser's state, so `resume` continues where training stopped;
* `toy.json` — the toy's name, its config (the toy's own dataclass, as JSON), the step reached and
  the training history (loss and the toy's evaluation metrics at each evaluation step).

Checkpoints are written whole into a temporary directory and swapped in (`fileio.atomic_dir`), so an
interrupt, at any moment, leaves the last complete checkpoint and no partial file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import MechscopeError
from ..fileio import atomic_dir

CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "toy.json")


class ToyError(MechscopeError, ValueError):
    """An impossible toy config, or a checkpoint that cannot be read."""


@dataclass
class TrainState:
    """Where training stands: the next step to run and what was measured so far."""

    step: int = 0
    history: list[dict] = field(default_factory=list)

    def last(self, key: str, default=None):
        """The most recent value of `key` in the history."""
        for row in reversed(self.history):
            if key in row:
                return row[key]
        return default


def config_to_dict(config) -> dict:
    """A toy config dataclass as JSON-ready values (tuples as lists)."""
    if not is_dataclass(config):
        raise TypeError(f"a toy config is a dataclass, got {type(config).__name__}")
    return json.loads(json.dumps(asdict(config)))


def config_from_dict(cls, data: dict, where: str = "config"):
    """Build the dataclass `cls` from JSON values; unknown fields name themselves."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ToyError(f"{where}: unknown field(s) {unknown} for {cls.__name__}; known: {sorted(known)}")
    values = {}
    for name, value in data.items():
        default = getattr(cls, name, None)
        values[name] = tuple(value) if isinstance(value, list) and isinstance(default, tuple) else value
    return cls(**values)


def save_checkpoint(path: str | os.PathLike, name: str, config, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, state: TrainState | None = None) -> Path:
    """Write the checkpoint directory `path` atomically (an existing one is replaced only when the new
    one is complete)."""
    from safetensors.torch import save_file

    path = Path(path)
    state = state or TrainState()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {"toy": name, "config": config_to_dict(config), "step": state.step, "history": state.history}
    with atomic_dir(path, replace=True) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "toy.json").write_text(json.dumps(meta, indent=1))
    return path


@dataclass
class Checkpoint:
    """A checkpoint read back: the toy's name, its config as JSON, the tensors and the state."""

    path: Path
    name: str
    config: dict
    tensors: dict[str, torch.Tensor]
    state: TrainState
    optimizer: dict | None


def read_checkpoint(path: str | os.PathLike, device=None, expect: str | None = None) -> Checkpoint:
    """Read a checkpoint directory; tensors go to `device` (the host by default). With `expect`, a
    checkpoint of another toy is refused with its path."""
    from safetensors.torch import load_file

    path = Path(path)
    meta_file = path / "toy.json"
    if not meta_file.is_file():
        raise ToyError(f"{path}: not a toy checkpoint (no toy.json)")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ToyError(f"{meta_file}: cannot read ({exc})") from None
    for key in ("toy", "config", "step", "history"):
        if key not in meta:
            raise ToyError(f"{meta_file}: field '{key}' is missing")
    if expect is not None and meta["toy"] != expect:
        raise ToyError(f"{path}: a checkpoint of toy '{meta['toy']}', not '{expect}'")
    if not (path / "model.safetensors").is_file():
        raise ToyError(f"{path}: model.safetensors is missing")
    tensors = load_file(str(path / "model.safetensors"), device=str(device or "cpu"))
    optimizer = None
    if (path / "optimizer.pt").is_file():
        optimizer = torch.load(path / "optimizer.pt", map_location=device or "cpu", weights_only=True)
    return Checkpoint(path, meta["toy"], meta["config"], tensors, TrainState(int(meta["step"]), list(meta["history"])),
                      optimizer)


def train_loop(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable[[int], torch.Tensor], *,
               steps: int, state: TrainState | None = None, eval_fn: Callable[[int], dict] | None = None,
               eval_every: int = 100, save: Callable[[TrainState], Any] | None = None, checkpoint_every: int = 0,
               stop_fn: Callable[[TrainState], bool] | None = None, progress: bool = True, desc: str = "training",
               scheduler=None, clip_grad: float | None = None) -> TrainState:
    """Run optimiser steps `state.step` .. `steps - 1`.

    `loss_fn(step)` returns the step's loss (the batch is the step's own, so a resumed run sees the
    same data); `eval_fn(step)` returns metrics recorded in the history every `eval_every` steps and
    at the end; `save(state)` writes a checkpoint every `checkpoint_every` steps and at the end;
    `stop_fn(state)` may end training early after an evaluation. A non-finite loss stops with an
    error naming the step. An interrupt (Ctrl-C) propagates; the last checkpoint written stays."""
    from tqdm.auto import tqdm

    state = state or TrainState()
    if steps < state.step:
        raise ToyError(f"the checkpoint is at step {state.step}, past the {steps} steps asked for")
    bar = tqdm(total=steps, initial=state.step, desc=desc, unit="step", disable=not progress)
    model.train()
    try:
        while state.step < steps:
            step = state.step
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(step)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise ToyError(f"the loss is {value} at step {step}; lower the learning rate or check the config")
            loss.backward()
            if clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            state.step = step + 1
            bar.update(1)
            last = state.step == steps
            stop = False
            if eval_fn is not None and (state.step % eval_every == 0 or last):
                model.eval()
                with torch.no_grad():
                    row = {"step": state.step, "loss": value, **eval_fn(state.step)}
                model.train()
                state.history.append(row)
                bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items() if k != "step"})
                stop = bool(stop_fn and stop_fn(state))
            if save is not None and ((checkpoint_every and state.step % checkpoint_every == 0) or last or stop):
                save(state)
            if stop:
                break
    finally:
        bar.close()
        model.eval()
    return state
