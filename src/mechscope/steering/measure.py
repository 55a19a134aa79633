"""What an intervention does: the behaviour it is meant to change, and what else it changes.

For a steering vector and a list of α:
  * behaviour: a metric `fn(logits [batch, d_vocab]) -> [batch]` on the final-position logits of
    held-out prompts (e.g. a concept's `Behaviour.score`: mean logit of the positive words minus the
    negative ones), its mean over the prompts at each α;
  * side effects on neutral text (by default text sampled from the model itself,
    `lens.text.sampled_text`): the mean KL(unsteered || steered) of the next-token distributions over
    every position after BOS, and the change in mean next-token loss (steered - unsteered).

Sweeping several layers, `SteeringSweep.best` picks the (layer, α) with the largest effect per unit of
side effect: effect = behaviour(α) - behaviour(0) in the direction of α's sign, side effect = the KL.
Since the effect grows like α and the KL like α², the ratio alone favours vanishing α; so only the
points whose effect reaches `min_effect` (by default half the largest effect in the sweep) compete.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..devices import HOST, batch_size_for, model_device
from ..errors import check_count, check_finite
from ..probes.activations import prompt_logits
from .apply import steered
from .vectors import SteeringError, SteeringVector

Behaviour = Callable[[torch.Tensor], torch.Tensor]


def behaviour_scores(model, behaviour: Behaviour, prompts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
    """[n_prompts] behaviour metric on the prompts' final-position logits (host float32)."""
    if not prompts:
        raise SteeringError("no held-out prompts to measure the behaviour on")
    scores = behaviour(prompt_logits(model, prompts, batch_size)).float().to(HOST)
    if scores.shape != (len(prompts),):
        raise SteeringError(f"the behaviour metric returned shape {tuple(scores.shape)} for {len(prompts)} prompts; "
                            f"it must return one number per prompt")
    check_finite(scores, "the behaviour metric")
    return scores


def neutral_tokens(model, tokens: torch.Tensor | None = None, length: int = 64, count: int = 16,
                   seed: int = 0, progress: bool = False) -> torch.Tensor:
    """Neutral text as [n, length] token ids: `tokens` when given, else text sampled from the model
    (`lens.text.sampled_text`, cached)."""
    if tokens is not None:
        if tokens.dim() != 2 or tokens.shape[1] < 2:
            raise SteeringError(f"neutral text must be [n, length >= 2] token ids, got shape {tuple(tokens.shape)}")
        return tokens
    from ..lens.text import sampled_text

    return sampled_text(model, length=length, count=count, seed=seed, progress=progress)


class _Reference:
    """The unsteered model's next-token log-probabilities on neutral text, batch by batch."""

    def __init__(self, model, tokens: torch.Tensor, batch_size: int | None):
        self.model = model
        self.device = model_device(model)
        bs = check_count("batch_size", batch_size_for(model, batch_size))
        self.batches = [tokens[i:i + bs].to(self.device) for i in range(0, len(tokens), bs)]
        self.base = [self._logprobs(b) for b in self.batches]

    @torch.no_grad()
    def _logprobs(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.model(batch)[:, :-1].float(), dim=-1)

    @torch.no_grad()
    def compare(self, context) -> tuple[float, float, float]:
        """(mean KL(unsteered || steered), mean steered loss, mean unsteered loss) under `context`."""
        kl_sum = loss_sum = base_sum = 0.0
        n = 0
        for batch, base in zip(self.batches, self.base):
            with context():
                lp = self._logprobs(batch)
            target = batch[:, 1:].unsqueeze(-1)
            kl_sum += float((base.exp() * (base - lp)).sum(-1).sum())
            loss_sum += float(-lp.gather(-1, target).sum())
            base_sum += float(-base.gather(-1, target).sum())
            n += target.numel()
        return kl_sum / n, loss_sum / n, base_sum / n


@dataclass
class SteeringPoint:
    hook_point: str
    layer: int | None
    alpha: float
    behaviour: float        # mean metric over the held-out prompts
    effect: float           # behaviour - behaviour at alpha 0
    kl: float               # mean KL(unsteered || steered) on neutral text, nats
    loss_change: float      # steered - unsteered mean next-token loss on neutral text, nats

    @property
    def efficiency(self) -> float:
        """Signed effect (towards alpha's side) per nat of KL."""
        sign = 1.0 if self.alpha >= 0 else -1.0
        return sign * self.effect / max(self.kl, 1e-9)


@dataclass
class SteeringSweep:
    points: list[SteeringPoint]
    baseline: float                     # behaviour of the unsteered model
    base_loss: float                    # unsteered next-token loss on the neutral text
    config: dict = field(default_factory=dict)

    def best(self, min_effect: float | None = None) -> SteeringPoint | None:
        """The point with the largest effect per unit KL among those whose effect (towards α's sign)
        reaches `min_effect` (default: half the largest such effect); None when nothing moves."""
        steered_points = [p for p in self.points if p.alpha != 0]
        signed = [(1.0 if p.alpha > 0 else -1.0) * p.effect for p in steered_points]
        if not steered_points or max(signed) <= 0:
            return None
        floor = 0.5 * max(signed) if min_effect is None else float(min_effect)
        ok = [p for p, s in zip(steered_points, signed) if s >= floor and s > 0]
        return max(ok, key=lambda p: p.efficiency) if ok else None

    def rows(self) -> list[dict]:
        return [{"hook_point": p.hook_point, "layer": p.layer, "alpha": p.alpha, "behaviour": p.behaviour,
                 "effect": p.effect, "kl": p.kl, "loss_change": p.loss_change, "efficiency": p.efficiency}
                for p in self.points]

    def to_json(self) -> dict:
        best = self.best()
        return {"baseline": self.baseline, "base_loss": self.base_loss, "config": self.config, "points": self.rows(),
                "best": None if best is None else {"hook_point": best.hook_point, "layer": best.layer,
                                                    "alpha": best.alpha, "effect": best.effect, "kl": best.kl,
                                                    "efficiency": best.efficiency}}


def sweep(model, vectors: SteeringVector | Sequence[SteeringVector], alphas: Sequence[float], behaviour: Behaviour,
          prompts: Sequence[str], neutral: torch.Tensor | None = None, positions: Sequence[int] | None = None,
          batch_size: int | None = None, progress: bool = False) -> SteeringSweep:
    """Behaviour on `prompts` and side effects on `neutral` text (see the module docstring) for each
    vector (e.g. one CAA vector per layer) at each α. α = 0 is measured once, unsteered."""
    from tqdm.auto import tqdm

    vectors = [vectors] if isinstance(vectors, SteeringVector) else list(vectors)
    if not vectors:
        raise SteeringError("no steering vectors to sweep")
    alphas = [float(a) for a in alphas]
    if not alphas:
        raise SteeringError("no alphas given")
    tokens = neutral_tokens(model, neutral, progress=progress)
    reference = _Reference(model, tokens, batch_size)
    base_scores = behaviour_scores(model, behaviour, prompts, batch_size)
    baseline = float(base_scores.mean())
    _, _, base_loss = reference.compare(nullcontext)
    points = []
    bar = tqdm(total=len(vectors) * len(alphas), desc="steering sweep", disable=not progress)
    for vec in vectors:
        for alpha in alphas:
            if alpha == 0:
                points.append(SteeringPoint(vec.hook_point, vec.layer, 0.0, baseline, 0.0, 0.0, 0.0))
            else:
                def context(vec=vec, alpha=alpha):
                    return steered(model, vec, alpha, positions)

                with context():
                    score = float(behaviour_scores(model, behaviour, prompts, batch_size).mean())
                kl, loss, _ = reference.compare(context)
                points.append(SteeringPoint(vec.hook_point, vec.layer, alpha, score, score - baseline, kl,
                                            loss - base_loss))
            bar.update(1)
    bar.close()
    return SteeringSweep(points, baseline, base_loss, {"alphas": alphas, "prompts": len(prompts),
                                                       "neutral": list(tokens.shape), "positions": positions})


@dataclass
class AblationResult:
    behaviour_before: float
    behaviour_after: float
    kl: float
    loss_change: float

    def to_json(self) -> dict:
        return dict(self.__dict__)


def ablation_effect(model, direction, behaviour: Behaviour, prompts: Sequence[str], neutral: torch.Tensor | None = None,
                    batch_size: int | None = None) -> AblationResult:
    """The behaviour before and after directional ablation of `direction`, and the ablation's side
    effects on neutral text."""
    from .ablation import ablated

    before = float(behaviour_scores(model, behaviour, prompts, batch_size).mean())
    with ablated(model, direction):
        after = float(behaviour_scores(model, behaviour, prompts, batch_size).mean())
    reference = _Reference(model, neutral_tokens(model, neutral), batch_size)
    kl, loss, base = reference.compare(lambda: ablated(model, direction))
    return AblationResult(before, after, kl, loss - base)
