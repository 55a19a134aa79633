"""Contrast-Consistent Search (Burns et al., 2022): an unsupervised direction from contrast pairs.

Each pair (a, b) holds two texts of which exactly one has label 1. The pair's side is randomised (with a
fixed data seed), so that which side holds the label-1 text is not a property of the side; each side is
then normalised with its own training mean and standard deviation, which removes whatever marks a text
as "side a" or "side b". A probe p(x) = sigmoid(w . x + b) is fitted to make p(a) and p(b) consistent,
p(a) = 1 - p(b), and confident, by minimising

    mean (p(a) - (1 - p(b)))^2 + mean min(p(a), p(b))^2

from several random starts (seeds). The score of a pair is (p(a) + 1 - p(b)) / 2; CCS knows no labels,
so its accuracy against them is taken up to sign: max(acc, 1 - acc). The spread over seeds is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..devices import HOST
from ..errors import check_count
from .linear import ProbeError


def ccs_loss(w: torch.Tensor, b, xa: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
    """The CCS loss of the probe (w [d], b) on normalised pair activations xa, xb [n, d]; with w [d, k] and
    b [k], the k probes' losses."""
    pa, pb = torch.sigmoid(xa @ w + b), torch.sigmoid(xb @ w + b)
    return ((pa - (1 - pb)) ** 2).mean(0) + (torch.minimum(pa, pb) ** 2).mean(0)


@dataclass
class CCSResult:
    """CCS at one hook point: per seed, the final loss, the held-out accuracy (up to sign) and the unit
    direction (mapped back from the normalised space to the activations' own: the weight divided by the
    features' scale), plus the seed with the lowest training loss."""

    losses: list[float]
    accuracies: list[float]
    directions: list[torch.Tensor] = field(repr=False)

    @property
    def best(self) -> int:
        return min(range(len(self.losses)), key=lambda i: self.losses[i])

    def summary(self) -> dict:
        acc = torch.tensor(self.accuracies, device=HOST)
        return {"ccs_mean": float(acc.mean()), "ccs_std": float(acc.std(unbiased=False)), "ccs_min": float(acc.min()),
                "ccs_max": float(acc.max()), "ccs_best_loss": self.accuracies[self.best],
                "ccs_seeds": len(self.accuracies)}


def orient_pairs(pairs: Sequence[tuple[int, int]], seed: int = 0):
    """(side a indices, side b indices, truth = 1 where side a holds the label-1 text), each pair's order
    drawn at random with `seed`."""
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(pairs), generator=g, device=HOST) < 0.5
    a = [q if f else p for (p, q), f in zip(pairs, flip.tolist())]
    b = [p if f else q for (p, q), f in zip(pairs, flip.tolist())]
    return a, b, (~flip).long()


class _Norm:
    def __init__(self, x: torch.Tensor):
        self.mean = x.mean(0)
        self.scale = x.std(0, unbiased=False).clamp_min(1e-6)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


def pair_accuracy(w: torch.Tensor, b, xa: torch.Tensor, xb: torch.Tensor, truth: torch.Tensor) -> float:
    """Accuracy up to sign of the pair scores (p(a) + 1 - p(b)) / 2 > 1/2 against `truth`."""
    score = (torch.sigmoid(xa @ w + b) + 1 - torch.sigmoid(xb @ w + b)) / 2
    acc = float(((score > 0.5).long() == truth.to(score.device)).float().mean())
    return max(acc, 1 - acc)


def _adamw(params, loss_fn, steps: int, lr: float, weight_decay: float) -> None:
    """`steps` steps of torch's AdamW (decoupled weight decay) on `loss_fn()`."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss_fn().backward()
        opt.step()


def fit_ccs(train_a: torch.Tensor, train_b: torch.Tensor, test_a: torch.Tensor, test_b: torch.Tensor,
            test_truth: torch.Tensor, seeds: int = 5, steps: int = 1000, lr: float = 1e-2,
            weight_decay: float = 0.01) -> CCSResult:
    """CCS from `seeds` random starts on training pairs (side a / side b activations [n, ...]), each
    scored on the test pairs against `test_truth` (1 where test side a holds the label-1 text)."""
    check_count("seeds", seeds)
    check_count("steps", steps)
    if len(train_a) < 2 or len(train_a) != len(train_b):
        raise ProbeError(f"CCS needs at least two training contrast pairs, got {len(train_a)}")
    if len(test_a) == 0 or len(test_a) != len(test_b):
        raise ProbeError("CCS needs at least one test contrast pair")
    flat = lambda x: x.reshape(len(x), -1).float()  # noqa: E731
    norm_a, norm_b = _Norm(flat(train_a)), _Norm(flat(train_b))
    xa, xb = norm_a(flat(train_a)), norm_b(flat(train_b))
    ta, tb = norm_a(flat(test_a)), norm_b(flat(test_b))
    d = xa.shape[1]
    # every seed's probe is trained at once (a column each): AdamW updates each entry on its own, so this
    # is the same as training them one after another
    g = torch.Generator(device="cpu").manual_seed(0)
    init = torch.stack([torch.randn(d, generator=g.manual_seed(s), device=HOST) / d ** 0.5 for s in range(seeds)], 1)
    w = init.to(xa.device).requires_grad_(True)
    b = torch.zeros(seeds, device=xa.device, requires_grad=True)
    _adamw([w, b], lambda: ccs_loss(w, b, xa, xb).sum(), steps, lr, weight_decay)
    losses, accs, dirs = [], [], []
    with torch.no_grad():
        for s in range(seeds):
            losses.append(float(ccs_loss(w[:, s], b[s], xa, xb)))
            accs.append(pair_accuracy(w[:, s], b[s], ta, tb, test_truth))
            raw = w[:, s] / ((norm_a.scale + norm_b.scale) / 2)  # back to the activations' own space
            dirs.append(raw / raw.norm().clamp_min(1e-12))
    return CCSResult(losses, accs, dirs)
