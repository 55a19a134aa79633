"""Supervised probes on activations: logistic regression, dense (L2) or sparse (L1, or the top-k neurons
by a ranking), the Hewitt & Liang control task, and probe directions a steering vector can use.

Fitting is plain torch: features are standardised with the training set's mean and standard deviation,
the L2 probe is fitted by Newton's method (in float64, with backtracking) on the mean log loss plus
`l2 / 2 * |w|^2 / n`, w the weights of the standardised features (scikit-learn's C = 1 / l2 after a
StandardScaler), and the L1 probe by FISTA (proximal gradient with soft thresholding) on the
mean log loss plus `l1 * |w|_1`. The weights are mapped back to the raw activation space, so a probe
applies to activations as `collect` returns them.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..devices import HOST
from ..errors import MechscopeError, ParameterError, check_count

KINDS = ("linear", "l1", "topk")


class ProbeError(MechscopeError, ValueError):
    """Labels that cannot train a probe, activations of the wrong shape, or a probe file that does not fit."""


@dataclass
class Probe:
    """A logistic-regression probe on one hook point: p(label 1 | x) = sigmoid(weight . x + bias), x the
    activation flattened. `neurons`: the features a top-k probe reads (the others have weight 0)."""

    hook_point: str
    weight: torch.Tensor          # [*shape] in the raw activation space
    bias: float
    kind: str = "linear"
    neurons: list[int] | None = None
    metrics: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    def logits(self, acts: torch.Tensor) -> torch.Tensor:
        """[n] decision values of activations [n, *shape]."""
        x = _features(acts, self.shape, self.hook_point)
        return x @ self.weight.reshape(-1).to(x.device, x.dtype) + self.bias

    def predict(self, acts: torch.Tensor) -> torch.Tensor:
        return (self.logits(acts) > 0).long()

    def accuracy(self, acts: torch.Tensor, labels) -> float:
        y = _labels(labels, len(acts), acts.device)
        return float((self.predict(acts) == y).float().mean())

    def direction(self) -> torch.Tensor:
        """The unit vector along the weight, shaped like the hook point's activation: the direction of
        label 1 (positive sentiment / plural / true) in that space."""
        norm = self.weight.norm()
        if norm == 0:
            raise ProbeError(f"the probe at {self.hook_point} has zero weight (nothing selected); it has no direction")
        return self.weight / norm

    @property
    def sparsity(self) -> int:
        """Number of non-zero weights."""
        return int((self.weight != 0).sum())


def _features(acts: torch.Tensor, shape: tuple[int, ...], where: str) -> torch.Tensor:
    if not isinstance(acts, torch.Tensor) or acts.dim() < 2:
        raise ProbeError(f"activations must be a tensor [n, ...], got {getattr(acts, 'shape', type(acts).__name__)}")
    if tuple(acts.shape[1:]) != tuple(shape):
        raise ProbeError(f"activations of shape {tuple(acts.shape[1:])} do not fit the probe at {where}, "
                         f"which reads shape {tuple(shape)}")
    return acts.reshape(len(acts), -1).float()


def _labels(labels, n: int, device) -> torch.Tensor:
    values = labels if isinstance(labels, torch.Tensor) else list(labels)
    y = torch.as_tensor(values, device=device).long().reshape(-1)
    if len(y) != n:
        raise ProbeError(f"{len(y)} labels for {n} activations")
    if n == 0:
        raise ProbeError("the label set is empty")
    if bool(((y != 0) & (y != 1)).any()):
        raise ProbeError("labels must be 0 or 1")
    return y


def check_labels(labels, n: int, device=HOST, what: str = "the training labels") -> torch.Tensor:
    """Labels as a long tensor, or ProbeError for an empty set, a wrong count, values other than 0/1, or
    one class only."""
    y = _labels(labels, n, device)
    if len(torch.unique(y)) < 2:
        raise ProbeError(f"{what} hold one class only (all {int(y[0])}, {n} examples); a probe needs both labels")
    return y


def _standardise(x: torch.Tensor):
    mean = x.mean(0)
    scale = x.std(0, unbiased=False)
    scale = torch.where(scale > 1e-8 * scale.max().clamp_min(1e-30), scale, torch.ones_like(scale))
    return (x - mean) / scale, mean, scale


def _penalised_loss(zb: torch.Tensor, yf: torch.Tensor, theta: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(zb @ theta, yf) + 0.5 * (reg * theta * theta).sum()


def _fit_l2(z: torch.Tensor, y: torch.Tensor, l2: float, max_iter: int):
    """Newton's method (with backtracking) on mean log loss + l2 / 2 |w|^2 / n; the penalty keeps the
    Hessian positive definite even on separable data."""
    n, d = z.shape
    yf = y.to(torch.float64)
    zb = torch.cat([z, torch.ones(n, 1, dtype=z.dtype, device=z.device)], 1).double()
    reg = torch.full((d + 1,), l2 / n, dtype=torch.float64, device=z.device)
    reg[d] = 1e-8  # the bias is (all but) unpenalised
    theta = torch.zeros(d + 1, dtype=torch.float64, device=z.device)
    loss = _penalised_loss(zb, yf, theta, reg)
    for _ in range(max_iter):
        p = torch.sigmoid(zb @ theta)
        grad = zb.T @ (p - yf) / n + reg * theta
        if float(grad.abs().max()) < 1e-9:
            break
        hess = (zb.T * (p * (1 - p) / n)) @ zb + torch.diag(reg)
        step = torch.linalg.solve(hess, grad)
        t = 1.0
        while True:
            cand = theta - t * step
            new = _penalised_loss(zb, yf, cand, reg)
            if new <= loss - 1e-4 * t * float(grad @ step) or t < 1e-8:
                break
            t /= 2
        if float(loss - new) < 1e-14:
            theta = cand
            break
        theta, loss = cand, new
    return theta[:d].to(z.dtype), float(theta[d])


def _fit_l1(z: torch.Tensor, y: torch.Tensor, l1: float, steps: int):
    """FISTA on mean log loss + l1 |w|_1 (bias not penalised)."""
    n, d = z.shape
    yf = y.to(z.dtype)
    zb = torch.cat([z, torch.ones(n, 1, dtype=z.dtype, device=z.device)], 1)
    lipschitz = 0.25 * float(torch.linalg.matrix_norm(zb, ord=2)) ** 2 / n
    step = 1.0 / max(lipschitz, 1e-12)
    theta = torch.zeros(d + 1, dtype=z.dtype, device=z.device)
    mom, t = theta.clone(), 1.0
    for _ in range(steps):
        grad = zb.T @ (torch.sigmoid(zb @ mom) - yf) / n
        nxt = mom - step * grad
        nxt[:d] = torch.sign(nxt[:d]) * (nxt[:d].abs() - step * l1).clamp_min(0)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        mom = nxt + (t - 1) / t_next * (nxt - theta)
        theta, t = nxt, t_next
    return theta[:d], float(theta[d])


def rank_neurons(acts: torch.Tensor, labels) -> torch.Tensor:
    """Feature indices (of the flattened activation) by decreasing |mean difference between the labels|
    divided by the pooled standard deviation."""
    if len(acts) == 0:
        raise ProbeError("the label set is empty: no activations to rank neurons on")
    x = acts.reshape(len(acts), -1).float()
    y = check_labels(labels, len(x), x.device)
    a, b = x[y == 1], x[y == 0]
    pooled = ((a.var(0, unbiased=False) + b.var(0, unbiased=False)) / 2).sqrt().clamp_min(1e-8)
    return torch.argsort((a.mean(0) - b.mean(0)).abs() / pooled, descending=True)


def fit_probe(acts: torch.Tensor, labels, hook_point: str = "", kind: str = "linear", *, l2: float = 1.0,
              l1: float = 0.01, k: int = 16, max_iter: int = 100) -> Probe:
    """A probe of `kind` ("linear": L2 logistic regression; "l1": L1 logistic regression; "topk": L2
    logistic regression on the `k` features ranked first by `rank_neurons`) fitted to activations
    [n, *shape] and their 0/1 labels."""
    if kind not in KINDS:
        raise ParameterError(f"unknown probe kind {kind!r}; kinds are {', '.join(KINDS)}")
    if not isinstance(acts, torch.Tensor) or acts.dim() < 2:
        raise ProbeError(f"activations must be a tensor [n, ...], got {getattr(acts, 'shape', type(acts).__name__)}")
    if l2 < 0 or l1 < 0:
        raise ParameterError("regularisation strengths l1 and l2 must be >= 0")
    check_count("max_iter", max_iter)
    if len(acts) == 0:
        raise ProbeError("the label set is empty: no activations to fit a probe to")
    shape = tuple(acts.shape[1:])
    x = acts.reshape(len(acts), -1).float()
    y = check_labels(labels, len(x), x.device)
    neurons = None
    if kind == "topk":
        k = min(check_count("k", k), x.shape[1])
        neurons = sorted(int(i) for i in rank_neurons(x, y)[:k])
        x = x[:, neurons]
    z, mean, scale = _standardise(x)
    if kind == "l1":
        w_std, b_std = _fit_l1(z, y, l1, steps=1000)
    else:
        w_std, b_std = _fit_l2(z, y, l2, max_iter)
    w = w_std / scale
    bias = b_std - float((w * mean).sum())
    if neurons is not None:
        full = torch.zeros(acts.reshape(len(acts), -1).shape[1], dtype=w.dtype, device=w.device)
        full[torch.tensor(neurons, dtype=torch.long, device=w.device)] = w
        w = full
    probe = Probe(hook_point, w.reshape(shape).detach(), bias, kind, neurons)
    probe.metrics["train_accuracy"] = probe.accuracy(acts, y)
    return probe


def control_labels(word_types: Sequence[str], seed: int = 0) -> list[int]:
    """The control task of Hewitt & Liang (2019): each distinct word type gets a random label (fixed by
    `seed`), and every text takes the label of its type. Both labels occur when there are two types or more."""
    types = sorted(set(word_types))
    if len(types) < 2:
        raise ProbeError(f"the control task needs at least two word types, got {len(types)}")
    rng = random.Random(seed)
    while True:
        assign = {t: rng.randint(0, 1) for t in types}
        if len(set(assign.values())) == 2:
            return [assign[t] for t in word_types]
