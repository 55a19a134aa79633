"""Training a sparse dictionary on a stream of activation batches.

`train(sae, batches, steps, lr)` takes any iterator of activation tensors (or (input, target) pairs
for transcoders), one optimizer step (Adam) per batch, and handles what every architecture needs:

- decoder norms: where the architecture keeps decoder rows at unit norm (TopK, BatchTopK, JumpReLU,
  Gated, Matryoshka and the transcoders / crosscoders using those), the component of each row's
  gradient along the row is removed before the step and the rows renormalised after it; where the
  norms are folded into the penalty (ReLU + L1, relu-activated transcoders / crosscoders) they are
  left free;
- the learning rate: a linear warm-up over `warmup_steps`, constant, then a linear decay to zero over
  the last `decay_fraction` of the steps;
- dead latents: tokens since each latent last fired; those past `dead_after` tokens are dead and
  feed AuxK (TopK-style architectures);
- progress: a tqdm bar with the running (exponential average) L0, FVU and dead count;
- checkpoints: every `checkpoint_every` steps (and at the end), the directory `checkpoint` is written
  atomically (the dictionary's own files, which `Dictionary.load` reads, plus the optimizer, schedule
  and counters), so an interrupt leaves the last complete one and no partial file; `resume=True`
  continues from it and, by default, skips the batches it had consumed, so a deterministic stream
  resumes to the same parameters as an uninterrupted run.

The first batch sets b_dec (autoencoders) to the batch's mean activation when `init_b_dec` is on and
training starts fresh.

`target_l0` (relu, gated, jumprelu) trains to a chosen L0 instead of a chosen coefficient: the sparsity
coefficient (JumpReLU: the thresholds, by a common factor) follows the batches' L0 (target_l0.py's
L0Controller, `l0_rate`), and a fresh run takes the firing points (encoder or gate biases, thresholds)
from the first batch. A BatchTopK dictionary's inference threshold
ends as the mean smallest kept activation over the last tenth of the steps (target_l0.py).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from .. import distributed
from ..errors import MechscopeWarning, check_count
from ..fileio import atomic_dir
from .architectures import loss as architecture_loss
from .dictionary import CONFIG, WEIGHTS, Dictionary, DictionaryConfig, DictionaryError
from .metrics import split_batch
from .target_l0 import ADAPTED_FIELDS, L0Controller, check_target, final_batch_threshold, init_density

STATE = "training.json"
OPTIMIZER = "optimizer.pt"


@dataclass
class TrainResult:
    """What a run did: steps and tokens in all (a resumed run counts from the start), the history of
    logged values, and tokens since each latent last fired."""

    steps: int = 0
    tokens: int = 0
    history: list[dict] = field(default_factory=list)
    tokens_since_fired: torch.Tensor | None = None

    def dead(self, dead_after: int) -> torch.Tensor:
        return self.tokens_since_fired >= dead_after


def lr_factor(step: int, steps: int, warmup_steps: int, decay_fraction: float) -> float:
    """The learning rate's multiplier at `step` (0-based): warm-up, constant, linear decay to 0."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = int(steps * decay_fraction)
    start = steps - decay_steps
    if decay_steps and step >= start:
        return max(0.0, (steps - step) / decay_steps)
    return 1.0


def _flat_rows(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


@torch.no_grad()
def remove_parallel_gradient(sae: Dictionary) -> None:
    """Take out of each decoder row's gradient its component along the (unit) row, so a step moves the
    row round the sphere rather than off it."""
    grad = sae.W_dec.grad
    if grad is None:
        return
    w, g = _flat_rows(sae.W_dec), _flat_rows(grad)
    unit = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    g -= (g * unit).sum(-1, keepdim=True) * unit


@torch.no_grad()
def normalize_decoder(sae: Dictionary) -> None:
    """Scale each decoder row (a crosscoder's over all its hook points) to unit norm."""
    w = _flat_rows(sae.W_dec)
    w /= w.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _check_checkpoint(path: Path, config: DictionaryConfig, adapted: bool = False) -> dict:
    for name in (CONFIG, WEIGHTS, STATE, OPTIMIZER):
        if not (path / name).is_file():
            raise DictionaryError(f"{path}: not a dictionary training checkpoint (no {name})")
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, ValueError) as exc:
        raise DictionaryError(f"{path / STATE}: not readable JSON ({exc})") from None
    saved = Dictionary.load(path).config
    # with target_l0 the coefficient (and a JumpReLU's bandwidth) move in training: the checkpoint's hold
    ignore = set(ADAPTED_FIELDS) if adapted and state.get("target_l0") is not None else set()
    diff = [k for k, v in config.to_json().items() if k not in ignore and saved.to_json().get(k) != v]
    if diff:
        raise DictionaryError(f"{path}: the checkpoint is of another dictionary (differs in {', '.join(diff)})")
    return state


def save_checkpoint(path: Path, sae: Dictionary, optimizer, scheduler, result: TrainResult, extra: dict) -> None:
    """Write the checkpoint directory atomically (replacing the previous one only once complete)."""
    with atomic_dir(path, error=DictionaryError, replace=True) as tmp:
        sae.write_files(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "tokens_since_fired": result.tokens_since_fired.cpu()}, tmp / OPTIMIZER)
        (tmp / STATE).write_text(json.dumps({"step": result.steps, "tokens": result.tokens,
                                             "history": result.history, **extra}, indent=1))


def train(sae: Dictionary, batches: Iterable, steps: int, lr: float = 2e-4, *,
          warmup_steps: int | None = None, decay_fraction: float = 0.2, betas=(0.9, 0.999),
          max_grad_norm: float | None = 1.0, dead_after: int = 1_000_000, init_b_dec: bool = True,
          checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 1000, resume: bool = False,
          skip_consumed: bool = True, log_every: int = 10, progress: bool = True,
          target_l0: float | None = None, l0_rate: float = 0.05) -> TrainResult:
    """Train `sae` in place for `steps` optimizer steps, one per batch of `batches`; see the module's
    docstring. Returns the TrainResult. An empty stream raises DictionaryError; a stream that ends
    early stops training there with a MechscopeWarning. `target_l0`: train a relu, gated or jumprelu
    dictionary to this L0 by adapting its coefficient at rate `l0_rate` (see the module's docstring)."""
    from tqdm.auto import tqdm

    steps = check_count("steps", steps)
    log_every = check_count("log_every", log_every)
    checkpoint_every = check_count("checkpoint_every", checkpoint_every)
    dead_after = check_count("dead_after", dead_after)
    if not lr > 0 or not math.isfinite(lr):
        raise DictionaryError(f"lr must be a positive number, got {lr}")
    if not 0 <= decay_fraction <= 1:
        raise DictionaryError(f"decay_fraction must be in [0, 1], got {decay_fraction}")
    warmup = min(1000, steps // 20) if warmup_steps is None else check_count("warmup_steps", warmup_steps, 0)
    target_l0 = check_target(sae, target_l0)
    c = sae.config
    unit = c.decoder_norm == "unit"
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr, betas=betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup, decay_fraction))
    result = TrainResult(tokens_since_fired=torch.zeros(c.d_sae, dtype=torch.int64, device=sae.device))
    ckpt = Path(checkpoint) if checkpoint is not None else None
    resumed_minima: list[float] = []
    if resume:
        if ckpt is None:
            raise DictionaryError("resume=True needs a checkpoint directory")
        if not ckpt.exists():
            raise DictionaryError(f"{ckpt}: no checkpoint to resume from")
        state = _check_checkpoint(ckpt, c, adapted=target_l0 is not None)
        if state.get("total_steps") != steps:
            raise DictionaryError(f"{ckpt}: the checkpoint was of a {state.get('total_steps')}-step run, "
                                  f"not {steps} steps (the learning-rate schedule depends on it)")
        if state.get("target_l0") != target_l0:
            raise DictionaryError(f"{ckpt}: the checkpoint was trained with target_l0={state.get('target_l0')}, "
                                  f"not {target_l0}")
        saved_dictionary = Dictionary.load(ckpt, device=sae.device)
        for name in ADAPTED_FIELDS:  # where target_l0 moved them; otherwise equal already
            setattr(c, name, getattr(saved_dictionary.config, name))
        sae.load_state_dict(saved_dictionary.state_dict())
        saved = torch.load(ckpt / OPTIMIZER, map_location=sae.device, weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        result.steps, result.tokens, result.history = state["step"], state["tokens"], state["history"]
        result.tokens_since_fired = saved["tokens_since_fired"].to(sae.device)
        resumed_minima = state.get("batch_minima", [])
    elif ckpt is not None and ckpt.exists() and (not ckpt.is_dir() or any(ckpt.iterdir())):
        raise DictionaryError(f"{ckpt}: a checkpoint is already there; pass resume=True to continue it, "
                              "or choose another directory")
    extra = {"total_steps": steps, "lr": lr, "warmup_steps": warmup, "decay_fraction": decay_fraction,
             "dead_after": dead_after, "target_l0": target_l0, "l0_rate": l0_rate}
    iterator = iter(batches)
    if resume and skip_consumed:
        for _ in range(result.steps):
            if next(iterator, None) is None:
                raise DictionaryError(f"{ckpt}: the stream ended before the {result.steps} batches the "
                                      "checkpoint had consumed")
    feat = 2 if c.architecture == "crosscoder" else 1
    # Data-parallel training (distributed.py): each rank's `batches` gives its own shard of every batch;
    # the gradients are all-reduced, weighted by token counts, so each step equals one process's step on
    # the concatenated batch. BatchTopK picks its latents over the whole batch: not separable by rank.
    parallel = distributed.active() and distributed.world_size() > 1
    if parallel and c.sparsity == "batchtopk":
        raise DictionaryError("batchtopk selects latents over the whole batch, which data-parallel training "
                              "splits across ranks; use topk (or one process) for batchtopk")
    controller = L0Controller(sae, target_l0, l0_rate) if target_l0 is not None else None
    minima = deque(maxlen=max(1, steps // 10)) if c.sparsity == "batchtopk" else None
    if minima is not None and resume:
        minima.extend(resumed_minima)
    running: dict[str, float] = {}
    sae.train()
    bar = tqdm(total=steps, initial=result.steps, desc=f"train {c.architecture}", unit="step",
               disable=not distributed.progress_enabled(progress))
    seen_any = result.steps > 0
    try:
        while result.steps < steps:
            with distributed.together():  # a bad batch on one rank stops every rank
                batch = next(iterator, None)
                if batch is not None:
                    x, y = split_batch(batch, sae)
                    if x.shape[0] == 0:
                        raise DictionaryError(f"batch {result.steps} has no tokens")
            n_local = 0 if batch is None else x.shape[0]
            n_tokens, ended = n_local, batch is None
            if parallel:  # tokens in the whole batch; the stream ends for all when it ends for one
                n_all, n_ended = distributed.sum_numbers(n_local, batch is None)
                n_tokens, ended = int(n_all), n_ended > 0
            if ended:
                if not seen_any:
                    raise DictionaryError("the activation stream is empty: no batch to train on")
                warnings.warn(f"the activation stream ended after {result.steps} of {steps} steps; "
                              "training stopped there", MechscopeWarning, stacklevel=2)
                break
            seen_any = True
            if result.steps == 0 and init_b_dec and not c.is_transcoder:
                with torch.no_grad():
                    sae.b_dec.copy_(distributed.all_reduce_sum(x.sum(0)) / n_tokens if parallel else x.mean(0))
            if result.steps == 0 and controller is not None:
                init_density(sae, x, target_l0)  # (averaged over the ranks in a data-parallel run)
            dead = result.tokens_since_fired >= dead_after
            with distributed.together():
                parts = architecture_loss(sae, x, y, dead)
                optimizer.zero_grad(set_to_none=True)
                parts.loss.backward()
            if parallel:
                average_gradients(sae, n_local, n_tokens)
            if unit:
                remove_parallel_gradient(sae)
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), max_grad_norm)
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                if unit:
                    normalize_decoder(sae)
                if c.sparsity == "jumprelu":
                    sae.threshold.clamp_(min=1e-6)
                fired = (parts.latents != 0).reshape(-1, c.d_sae).any(0)
                if parallel:
                    fired = distributed.all_reduce_max(fired.to(torch.int32)).bool()
                result.tokens_since_fired += n_tokens
                result.tokens_since_fired[fired] = 0
                if controller is not None:
                    active = float((parts.latents != 0).reshape(-1, c.d_sae).sum())
                    if parallel:
                        active, _ = distributed.sum_numbers(active, 0)
                    controller.update(active / n_tokens)
                if minima is not None:
                    kept = parts.latents[parts.latents > 0]
                    if kept.numel():
                        minima.append(float(kept.min()))
            result.steps += 1
            result.tokens += n_tokens
            if result.steps % log_every == 0 or result.steps == steps:
                row = _log_row(parts, x if y is None else y, feat, result, dead_after, optimizer)
                if controller is not None and not controller.thresholds:
                    row[controller.field] = controller.coefficient
                result.history.append(row)
                for key in ("l0", "fvu"):
                    running[key] = row[key] if key not in running else 0.9 * running[key] + 0.1 * row[key]
                bar.set_postfix(l0=f"{running['l0']:.1f}", fvu=f"{running['fvu']:.3f}", dead=row["dead"])
            bar.update(1)
            if minima and result.steps == steps:  # BatchTopK's inference threshold, before the last checkpoint
                value = final_batch_threshold(list(minima))
                if value is not None:
                    with torch.no_grad():
                        sae.threshold.fill_(value)
            if ckpt is not None and (result.steps % checkpoint_every == 0 or result.steps == steps) \
                    and distributed.is_main():
                save_checkpoint(ckpt, sae, optimizer, scheduler, result, _with_minima(extra, minima))
    finally:
        bar.close()
    if ckpt is not None and result.steps % checkpoint_every and result.steps < steps and distributed.is_main():
        save_checkpoint(ckpt, sae, optimizer, scheduler, result, _with_minima(extra, minima))
    sae.eval()
    return result


def _with_minima(extra: dict, minima) -> dict:
    """The checkpoint's state with BatchTopK's window of batch minima, which a resumed run continues."""
    return extra if minima is None else {**extra, "batch_minima": list(minima)}


@torch.no_grad()
def average_gradients(sae: Dictionary, n_local: int, n_total: int) -> None:
    """All-reduce the gradients of a data-parallel step: each rank's loss is a mean over its n_local
    tokens, so the whole batch's gradient is sum over ranks of (n_local / n_total) * gradient."""
    params = [p for p in sae.parameters() if p.grad is not None]
    if not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params]) * (n_local / n_total)
    flat = distributed.all_reduce_sum(flat)
    start = 0
    for p in params:
        p.grad.copy_(flat[start:start + p.numel()].view_as(p.grad))
        start += p.numel()


@torch.no_grad()
def _log_row(parts, target, feat, result: TrainResult, dead_after: int, optimizer) -> dict:
    from .metrics import fvu

    f = parts.latents
    row = {"step": result.steps, "tokens": result.tokens, "loss": float(parts.loss),
           "l0": float((f != 0).sum(-1).float().mean()), "fvu": float(fvu(target, parts.output, feat)),
           "dead": int((result.tokens_since_fired >= dead_after).sum()),
           "lr": float(optimizer.param_groups[0]["lr"])}
    row.update({k: float(v) for k, v in parts.parts.items()})
    return row
