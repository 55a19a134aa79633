"""Metrics of a sparse dictionary on activations (method.md §11), on tensors or streamed over batches.

- L0: the mean number of active latents per token;
- FVU, the fraction of variance unexplained: ‖x − x̂‖² / ‖x − mean(x)‖², summed over tokens and
  features, with mean(x) the mean activation over the tokens (per feature);
- dead latents: those never active in the N tokens seen;
- the latent density histogram: how many latents fire on what fraction of tokens (log10 bins), with
  the dead ones counted apart (their density is 0, off a log scale).

`LatentStats` accumulates all of them over a stream of batches in float64, so held-out sets of any size
give the same numbers as one concatenated tensor would; `evaluate` runs a dictionary over a stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor

from .dictionary import Dictionary, DictionaryError


def _tokens(x: Tensor, feature_dims: int) -> Tensor:
    """x as [n_tokens, features] (the last `feature_dims` axes are features)."""
    return x.reshape(-1, math.prod(x.shape[x.dim() - feature_dims:]) if feature_dims else 1)


def l0(latents: Tensor) -> Tensor:
    """Mean count of non-zero latents per token; latents [..., d_sae]."""
    return (latents != 0).sum(-1).to(torch.float64).mean()


def fvu(x: Tensor, x_hat: Tensor, feature_dims: int = 1) -> Tensor:
    """‖x − x̂‖² / ‖x − mean(x)‖² over all tokens; the last `feature_dims` axes are features (2 for a
    crosscoder's [..., n_hooks, d])."""
    if x.shape != x_hat.shape:
        raise DictionaryError(f"fvu: activations {tuple(x.shape)} and reconstructions {tuple(x_hat.shape)} "
                              "differ in shape")
    a, b = _tokens(x, feature_dims).to(torch.float64), _tokens(x_hat, feature_dims).to(torch.float64)
    total = (a - a.mean(0)).pow(2).sum()
    return (a - b).pow(2).sum() / total


def fire_counts(latents: Tensor) -> Tensor:
    """How many tokens each latent is active on, [d_sae] (int64)."""
    return (latents.reshape(-1, latents.shape[-1]) != 0).sum(0)


def dead_latents(latents: Tensor) -> Tensor:
    """[d_sae] bool: latents never active over the tokens of `latents` [..., d_sae]."""
    return fire_counts(latents) == 0


def density_histogram(counts: Tensor, n_tokens: int, bins: int = 40, low: float = -8.0):
    """(edges [bins + 1], histogram [bins], n_dead): latents by log10(fires / n_tokens), from `low`
    to 0; densities below 10**low land in the first bin, dead latents (density 0) in n_dead only."""
    if n_tokens < 1:
        raise DictionaryError("density histogram: no tokens seen")
    counts = counts.to(torch.float64)
    alive = counts > 0
    log_density = torch.log10(counts[alive] / n_tokens).clamp(min=low)
    edges = torch.linspace(low, 0.0, bins + 1, dtype=torch.float64, device=counts.device)
    hist = torch.histc(log_density, bins=bins, min=low, max=0.0) if log_density.numel() else \
        torch.zeros(bins, dtype=torch.float64, device=counts.device)
    return edges, hist.to(torch.int64), int((~alive).sum())


@dataclass
class LatentStats:
    """Running sums for L0, FVU, dead latents and densities over batches (float64, on the batches'
    device)."""

    n_tokens: int = 0
    active: Tensor | None = None       # total active latents (for L0)
    counts: Tensor | None = None       # fires per latent [d_sae]
    error: Tensor | None = None        # Σ‖x − x̂‖²
    sum_x: Tensor | None = None        # Σ x per feature
    sum_sq: Tensor | None = None       # Σ ‖x‖²

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, latents: Tensor, feature_dims: int = 1) -> None:
        a, b = _tokens(x, feature_dims).to(torch.float64), _tokens(x_hat, feature_dims).to(torch.float64)
        f = latents.reshape(-1, latents.shape[-1])
        if f.shape[0] != a.shape[0]:
            raise DictionaryError(f"latents for {f.shape[0]} tokens but activations for {a.shape[0]}")
        if self.counts is None:
            self.active = torch.zeros((), dtype=torch.float64, device=a.device)
            self.counts = torch.zeros(f.shape[-1], dtype=torch.int64, device=a.device)
            self.error = torch.zeros((), dtype=torch.float64, device=a.device)
            self.sum_x = torch.zeros(a.shape[-1], dtype=torch.float64, device=a.device)
            self.sum_sq = torch.zeros((), dtype=torch.float64, device=a.device)
        self.n_tokens += a.shape[0]
        fired = f != 0
        self.active += fired.sum()
        self.counts += fired.sum(0)
        self.error += (a - b).pow(2).sum()
        self.sum_x += a.sum(0)
        self.sum_sq += a.pow(2).sum()

    def _check(self):
        if self.counts is None or self.n_tokens == 0:
            raise DictionaryError("no tokens were measured (an empty activation stream)")

    def l0(self) -> float:
        self._check()
        return float(self.active / self.n_tokens)

    def fvu(self) -> float:
        self._check()
        total = self.sum_sq - self.sum_x.pow(2).sum() / self.n_tokens
        return float(self.error / total)

    def dead(self) -> Tensor:
        self._check()
        return self.counts == 0

    def histogram(self, bins: int = 40, low: float = -8.0):
        self._check()
        return density_histogram(self.counts, self.n_tokens, bins, low)

    def summary(self) -> dict:
        edges, hist, n_dead = self.histogram()
        return {"tokens": self.n_tokens, "l0": self.l0(), "fvu": self.fvu(), "dead": n_dead,
                "dead_fraction": n_dead / int(self.counts.numel()),
                "density_edges": [round(float(e), 6) for e in edges], "density_histogram": hist.tolist()}


def split_batch(batch, sae: Dictionary) -> tuple[Tensor, Tensor | None]:
    """(input, target) from a batch: a tensor (autoencoders) or an (input, target) pair (transcoders),
    moved to the dictionary's device and dtype and flattened to tokens."""
    c = sae.config
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise DictionaryError(f"a batch must be a tensor or an (input, target) pair, got {len(batch)} items")
        x, y = batch
    else:
        x, y = batch, None
    if not isinstance(x, Tensor) or (y is not None and not isinstance(y, Tensor)):
        raise DictionaryError(f"a batch must hold tensors, got {type(x).__name__}")
    if c.is_transcoder and y is None:
        raise DictionaryError(f"a {c.architecture} trains on (input, target) pairs of {c.hook_point} and "
                              f"{c.out_hook_point}; got activations alone")
    sae.check_input(x, f"activations of {c.hook_point or 'the input'}")
    feat = 2 if c.architecture == "crosscoder" else 1
    x = x.to(sae.device, sae.dtype).reshape(-1, *x.shape[x.dim() - feat:])
    if y is not None:
        width = c.out_width
        if y.shape[-1] != width or y.shape[:-1].numel() != x.shape[0]:
            raise DictionaryError(f"targets of shape {tuple(y.shape)} do not fit: {x.shape[0]} tokens of width "
                                  f"{width} at {c.out_hook_point or c.hook_point} expected")
        y = y.to(sae.device, sae.dtype).reshape(-1, *y.shape[y.dim() - feat:])
    return x, y


@torch.no_grad()
def evaluate(sae: Dictionary, batches: Iterable, max_tokens: int | None = None) -> LatentStats:
    """L0, FVU, dead latents and densities of `sae` (in eval mode) over a stream of batches (tensors, or
    (input, target) pairs for transcoders), up to `max_tokens` tokens."""
    was_training = sae.training
    sae.eval()
    stats = LatentStats()
    feat = 2 if sae.config.architecture == "crosscoder" else 1
    try:
        for batch in batches:
            x, y = split_batch(batch, sae)
            if max_tokens is not None:
                room = max_tokens - stats.n_tokens
                if room <= 0:
                    break
                x, y = x[:room], (None if y is None else y[:room])
            f = sae.encode(x)
            out = sae.decode(f)
            skip = sae.skip(x)
            out = out if skip is None else out + skip
            stats.update(x if y is None else y, out, f, feat)
    finally:
        sae.train(was_training)
    stats._check()
    return stats
