"""Training to a chosen L0 for the architectures whose sparsity is a penalty, not a count.

TopK-style dictionaries fire k latents by construction. ReLU + L1, Gated and JumpReLU instead trade
reconstruction against a coefficient (l1_coefficient, or l0_coefficient for JumpReLU), and the L0 a
coefficient gives is only known after training. Comparing architectures "at a matched L0" then needs
a sweep of full runs. `train(..., target_l0=L)` avoids it with two things this module provides:

- `L0Controller`: after each step, the coefficient is multiplied by (L0_batch / L)^rate, an integral
  controller on log λ: too dense raises the penalty, too sparse lowers it. The final coefficient stays
  in the dictionary's config, so the saved dictionary records what it was trained with.
  JumpReLU is steered through its thresholds instead: its L0 penalty reaches them only through the
  straight-through estimator's narrow kernel, and Adam moves each threshold by about the learning rate
  per step, far less than thresholds of the size raw activations give (units, for a residual stream of
  norm ~100) would need. Its reconstruction gradient meanwhile raises them (a latent that fires adds
  at least θ·W_dec,i, which often overshoots), so its L0 falls below the target whatever the
  coefficient. After each step the controller therefore multiplies every threshold by the same
  (L0_batch / L)^rate; the STE still learns the thresholds' relative sizes, and l0_coefficient is left
  as given.
- `init_density`: with a fixed starting point a short run never reaches the target. Adam moves each
  parameter by about the learning rate per step whatever the coefficient, and activations of norm
  ~100 (a residual stream) put the pre-activations far from where the target density lies: a ReLU
  encoder bias or a JumpReLU threshold would need thousands of steps to get there. Taken from the
  first batch instead, each latent's firing point is its pre-activation's quantile at density
  L / d_sae (its m-th largest value over the batch's n tokens, m = round(n·L / d_sae), at least 1):
  a ReLU encoder bias (a Gated gate bias) is lowered by it, a JumpReLU threshold set to it. Training
  then starts at about the target L0. For JumpReLU the STE bandwidth ε is also set, to
  `bandwidth_fraction` times the median threshold, so the rectangle kernel sees a useful share of the
  tokens in the data's own units (the 0.001 default assumes activations normalised to unit scale).

`final_batch_threshold` serves BatchTopK: its inference threshold is estimated during training as a
running average of the smallest activation kept per batch; a short run's average still carries the
early batches, whose values differ from the trained dictionary's. At the end of training it is replaced
by the mean over the last steps (the learning-rate decay, when the dictionary has settled).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import distributed
from .dictionary import Dictionary, DictionaryError

COEFFICIENT = {"relu": "l1_coefficient", "gated": "l1_coefficient", "jumprelu": "l0_coefficient"}
ADAPTED_FIELDS = ("l1_coefficient", "jumprelu_bandwidth")  # the config fields target_l0 may change


def check_target(sae: Dictionary, target_l0: float | None) -> float | None:
    """`target_l0` validated for `sae`: a positive number below d_sae, for a penalty-sparse dictionary."""
    if target_l0 is None:
        return None
    c = sae.config
    if c.sparsity not in COEFFICIENT:
        raise DictionaryError(f"target_l0 is for relu, gated and jumprelu sparsity; a {c.sparsity} "
                              f"dictionary fires k={c.k} latents per token by construction (set k instead)")
    if isinstance(target_l0, bool) or not isinstance(target_l0, (int, float)) or not 0 < target_l0 < c.d_sae:
        raise DictionaryError(f"target_l0 must be a number between 0 and d_sae={c.d_sae}, got {target_l0!r}")
    return float(target_l0)


class L0Controller:
    """Multiplies the sparsity coefficient of `sae` (a jumprelu: its thresholds) by (l0 / target)^rate
    after each step, clamped to a factor of 2 per step (the coefficient to [1e-8, 1e8])."""

    def __init__(self, sae: Dictionary, target: float, rate: float = 0.05):
        if not rate > 0:
            raise DictionaryError(f"the L0 controller's rate must be positive, got {rate}")
        self.sae, self.target, self.rate = sae, float(target), float(rate)
        self.field = COEFFICIENT[sae.config.sparsity]
        self.thresholds = sae.config.sparsity == "jumprelu"

    @property
    def coefficient(self) -> float:
        return float(getattr(self.sae.config, self.field))

    @torch.no_grad()
    def update(self, l0: float) -> float:
        """Adjust for a batch whose mean L0 was `l0`; returns the factor applied (to the coefficient,
        or to a jumprelu's thresholds)."""
        ratio = max(float(l0), 1e-3) / self.target
        factor = math.exp(max(-math.log(2), min(math.log(2), self.rate * math.log(ratio))))
        if self.thresholds:
            self.sae.threshold.mul_(factor).clamp_(min=1e-6)
        else:
            setattr(self.sae.config, self.field, min(max(self.coefficient * factor, 1e-8), 1e8))
        return factor


@torch.no_grad()
def init_density(sae: Dictionary, x: Tensor, target_l0: float, bandwidth_fraction: float = 0.1) -> None:
    """Move each latent's firing point (a relu encoder bias, a gated gate bias, a jumprelu threshold) so
    that on the batch `x` it fires on about target_l0 / d_sae of the tokens; see the module's docstring.
    Collective in a data-parallel run: the ranks' quantiles are averaged, so every rank starts alike."""
    c = sae.config
    if c.sparsity not in COEFFICIENT:
        raise DictionaryError(f"init_density is for relu, gated and jumprelu dictionaries, not {c.sparsity}")
    pre = sae.pre_activations(x.to(sae.dtype)).reshape(-1, c.d_sae)
    m = min(max(1, round(pre.shape[0] * target_l0 / c.d_sae)), pre.shape[0])
    quantile = pre.topk(m, dim=0).values[-1]
    if distributed.active() and distributed.world_size() > 1:  # one starting point: the ranks' estimates averaged
        quantile = distributed.all_reduce_sum(quantile) / distributed.world_size()
    if c.sparsity == "jumprelu":
        sae.threshold.copy_(quantile.clamp_min(c.threshold_init))
        c.jumprelu_bandwidth = max(bandwidth_fraction * float(sae.threshold.median()), 1e-6)
    else:
        bias = sae.b_gate if c.sparsity == "gated" else sae.b_enc
        bias.sub_(quantile)


def final_batch_threshold(minima: list[float]) -> float | None:
    """The BatchTopK inference threshold from the smallest kept activation of each of the last steps."""
    kept = [v for v in minima if v > 0 and math.isfinite(v)]
    return sum(kept) / len(kept) if kept else None
