"""The tuned lens (Belrose et al. 2023): before decoding the residual stream of layer l with the final
norm and unembedding, move it by a learned affine translator,

    translated = h + A_l h + b_l,     A_l = 0 and b_l = 0 at the start (the identity: the logit lens),

trained so that the decoded distribution matches the model's final one: loss KL(final || lens), the
mean over positions, summed over layers; the model is frozen.

Training (`train_tuned_lens`) is built for a CPU: each forward pass of the model keeps only the
residual streams (run_with_cache of the hook_resid_* names), its positions go into a shuffled pool, and
each optimizer step draws `tokens_per_step` positions from the pool and trains every layer's translator
on them together (one backward per layer, so only one layer's [positions, d_vocab] logits are alive at
a time). The cost is the unembedding: d_vocab x d_model multiply-adds per position per layer, forward
and backward. Adam, with a linear warm-up over the first tenth of the steps and a cosine decay to zero;
each layer's bias learns at `lr` times the typical size (RMS) of its stream, so it moves at the same
relative speed at every depth.

The final stream needs no translator (its logit lens is the model's output), so a lens holds
n_layers translators: the embedding's and those of layers 0 .. n_layers-2.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..devices import HOST, model_device
from ..errors import ParameterError, check_count
from .logit_lens import LensError, decode, frozen, kl_to_final, residuals, streams

WEIGHTS = "lens.safetensors"
CONFIG = "lens.json"
FORMAT = 1


class TunedLens(torch.nn.Module):
    """Affine translators for the streams of `streams(model)` but the last (see the module docstring)."""

    def __init__(self, d_model: int, n_layers: int, config: dict | None = None, device=None, dtype=torch.float32):
        super().__init__()
        self.d_model, self.n_layers = int(d_model), int(n_layers)
        # One tensor per translator, so each layer's bias can have its own learning rate.
        self.A = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(d_model, d_model, device=device, dtype=dtype))
                                         for _ in range(n_layers)])
        self.b = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(d_model, device=device, dtype=dtype))
                                         for _ in range(n_layers)])
        self.config = dict(config or {})

    @classmethod
    def for_model(cls, model, **config) -> "TunedLens":
        """An identity lens (A = 0, b = 0) for `model`, on its device."""
        cfg = model.cfg
        dtype = next(model.parameters()).dtype
        base = {"model": str(getattr(model, "mechscope_name", cfg.model_name)), "d_model": cfg.d_model,
                "n_layers": cfg.n_layers, "d_vocab": cfg.d_vocab, "streams": [s for s, _ in streams(model)]}
        return cls(cfg.d_model, cfg.n_layers, {**base, **config}, device=model_device(model), dtype=dtype)

    def check_fits(self, model, where: str = "tuned lens") -> None:
        """LensError unless this lens was made for a model of `model`'s shape."""
        cfg = model.cfg
        have = (self.d_model, self.n_layers, self.config.get("d_vocab", cfg.d_vocab))
        want = (cfg.d_model, cfg.n_layers, cfg.d_vocab)
        if have != want:
            raise LensError(
                f"{where} was trained for a model with d_model {have[0]}, {have[1]} layers and d_vocab {have[2]} "
                f"({self.config.get('model', 'unknown model')}), but this model has d_model {want[0]}, "
                f"{want[1]} layers and d_vocab {want[2]} ({getattr(model, 'mechscope_name', cfg.model_name)})")

    def translate(self, index: int, h: torch.Tensor) -> torch.Tensor:
        """Stream `index` of `streams(model)` moved by its translator (the last stream: unchanged)."""
        if index == self.n_layers:
            return h
        A, b = self.A[index], self.b[index]
        return h + h @ A.T.to(h.dtype) + b.to(h.dtype)

    def decode(self, model, index: int, h: torch.Tensor) -> torch.Tensor:
        return decode(model, self.translate(index, h))

    # --- files ---------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, overwrite: bool = True) -> Path:
        """Write the lens directory `path` (lens.safetensors + lens.json) at once: a reader never sees
        half a lens, and a failed or interrupted save leaves the previous one (or nothing)."""
        from safetensors.torch import save_file

        from ..fileio import atomic_dir

        path = Path(path)
        with atomic_dir(path, replace=overwrite) as tmp:
            tensors = {"A": torch.stack([a.detach() for a in self.A]).to(HOST).contiguous(),
                       "b": torch.stack([b.detach() for b in self.b]).to(HOST).contiguous()}
            save_file(tensors, str(tmp / WEIGHTS))
            config = {"format": FORMAT, "kind": "tuned_lens", **self.config, "d_model": self.d_model,
                      "n_layers": self.n_layers}
            (tmp / CONFIG).write_text(json.dumps(config, indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model=None) -> "TunedLens":
        """A lens saved with `save`; with `model`, checked against it and put on its device."""
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_dir():
            raise LensError(f"{path}: not a tuned lens directory (no such directory)" if not path.exists()
                            else f"{path}: not a tuned lens directory (a file; give the directory saved by train)")
        for name in (CONFIG, WEIGHTS):
            if not (path / name).is_file():
                raise LensError(f"{path}: not a tuned lens directory (no {name})")
        try:
            config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
            tensors = load_file(str(path / WEIGHTS))
        except Exception as exc:
            raise LensError(f"{path}: cannot read the tuned lens ({type(exc).__name__}: {exc})") from None
        if not isinstance(config, dict) or config.get("kind") != "tuned_lens":
            raise LensError(f"{path / CONFIG}: not a tuned lens configuration")
        try:
            d, n = int(config["d_model"]), int(config["n_layers"])
        except (KeyError, TypeError, ValueError):
            raise LensError(f"{path / CONFIG}: missing or bad field 'd_model' or 'n_layers'") from None
        A, b = tensors.get("A"), tensors.get("b")
        if A is None or b is None or tuple(A.shape) != (n, d, d) or tuple(b.shape) != (n, d):
            raise LensError(f"{path / WEIGHTS}: tensors A {None if A is None else list(A.shape)} and b "
                            f"{None if b is None else list(b.shape)} do not fit d_model {d} and {n} layers")
        lens = cls(d, n, {k: v for k, v in config.items() if k not in ("format", "kind")}, dtype=A.dtype)
        with torch.no_grad():
            for i in range(n):
                lens.A[i].copy_(A[i])
                lens.b[i].copy_(b[i])
        if model is not None:
            lens.check_fits(model, f"{path}")
            lens.to(model_device(model))
        return lens


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


@dataclass
class TrainingLog:
    steps: int
    tokens: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # the mean KL over layers at each step

    def to_json(self) -> dict:
        return {"steps": self.steps, "tokens": self.tokens, "seconds": round(self.seconds, 2),
                "first_loss": self.losses[0] if self.losses else None,
                "last_loss": self.losses[-1] if self.losses else None}


class _PositionPool:
    """Residual streams of non-BOS positions, drawn in a shuffled order; refilled by one forward pass
    of `seqs_per_forward` sequences (taken in a shuffled order, again and again) when empty."""

    def __init__(self, model, tokens: torch.Tensor, seqs_per_forward: int, gen: torch.Generator):
        self.model, self.tokens, self.n, self.gen = model, tokens, seqs_per_forward, gen
        self.order: list[int] = []
        self.resid = None
        self.left = torch.empty(0, dtype=torch.long, device=HOST)

    def _refill(self) -> None:
        if not self.order:
            self.order = torch.randperm(len(self.tokens), generator=self.gen, device=HOST).tolist()
        rows, self.order = self.order[: self.n], self.order[self.n:]
        batch = self.tokens[rows].to(model_device(self.model))
        resid = residuals(self.model, batch)[:, :, 1:]  # position 0 is BOS: the same at every layer
        self.resid = resid.reshape(resid.shape[0], -1, resid.shape[-1])
        self.left = torch.randperm(self.resid.shape[1], generator=self.gen, device=HOST)

    def draw(self, k: int) -> torch.Tensor:
        """[n_streams, k, d_model]."""
        parts = []
        while k > 0:
            if len(self.left) == 0:
                self._refill()
            take, self.left = self.left[:k], self.left[k:]
            parts.append(self.resid[:, take.to(self.resid.device)])
            k -= len(take)
        return torch.cat(parts, dim=1)


def _schedule(steps: int) -> Callable[[int], float]:
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


def train_tuned_lens(model, tokens: torch.Tensor, *, n_tokens: int = 2048, tokens_per_step: int = 128,
                     lr: float = 1e-3, seed: int = 0, seqs_per_forward: int = 8, out: str | os.PathLike | None = None,
                     progress: bool = True, callback: Callable[[int, float], None] | None = None,
                     text: dict | None = None) -> tuple[TunedLens, TrainingLog]:
    """Train a tuned lens for `model` on `tokens` ([n, length], BOS first): `n_tokens` positions in all,
    `tokens_per_step` per Adam step (see the module docstring). `callback(step, loss)` runs after each
    step. With `out`, the lens directory is written there once training is complete (so an interrupted
    training leaves nothing); `text` describes the training text in the saved configuration."""
    from tqdm.auto import tqdm

    check_count("n_tokens", n_tokens)
    check_count("tokens_per_step", tokens_per_step)
    check_count("seqs_per_forward", seqs_per_forward)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ParameterError(f"lr must be a finite number > 0, got {lr!r}")
    if tokens.dim() != 2 or tokens.shape[1] < 2 or tokens.shape[0] < 1:
        raise ParameterError(f"tokens must be [n, length] with length >= 2, got {list(tokens.shape)}")
    steps = math.ceil(n_tokens / tokens_per_step)
    gen = torch.Generator(device=HOST).manual_seed(seed)
    lens = TunedLens.for_model(model, seed=seed, lr=lr, tokens_per_step=tokens_per_step, steps=steps,
                               training_tokens=steps * tokens_per_step, text=text or {})
    pool = _PositionPool(model, tokens, seqs_per_forward, gen)
    n = lens.n_layers
    with frozen(model):
        first = pool.draw(tokens_per_step)
        scale = first[:n].float().pow(2).mean(-1).sqrt().mean(-1).tolist()  # RMS of each stream
        groups = [{"params": list(lens.A), "lr": lr}] + [{"params": [lens.b[i]], "lr": lr * scale[i]} for i in range(n)]
        optimizer = torch.optim.Adam(groups)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(steps))
        log = TrainingLog(steps=steps, tokens=steps * tokens_per_step, seconds=0.0)
        start = time.perf_counter()
        bar = tqdm(range(steps), desc="training tuned lens", unit="step", disable=not progress)
        batch = first
        for step in bar:
            if step:
                batch = pool.draw(tokens_per_step)
            with torch.no_grad():
                target = torch.log_softmax(decode(model, batch[n]).float(), dim=-1)
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for i in range(n):
                loss = kl_to_final(target, lens.decode(model, i, batch[i])).mean()
                loss.backward()
                total += loss.item()
            optimizer.step()
            scheduler.step()
            log.losses.append(total / n)
            bar.set_postfix(kl=f"{total / n:.3f}")
            if callback is not None:
                callback(step, total / n)
        bar.close()
        log.seconds = time.perf_counter() - start
    lens.config["training_seconds"] = round(log.seconds, 2)
    lens.eval()
    for p in lens.parameters():
        p.requires_grad_(False)
    if out is not None:
        lens.save(out)
    return lens, log
