"""A dictionary measured on the model (method.md §11): what splicing it in costs the model's predictions.

`measure(model, sae, tokens)` runs held-out token sequences four ways:

  * clean: the model as it is;
  * spliced: the dictionary's reconstruction x̂ in place of the activation, without the error term
    (`splice(..., keep_error=False)`; a transcoder's output in place of its target's activation);
  * zero-ablated: the activation (a transcoder's target) replaced by zeros;
  * mean-ablated: replaced by its mean over the held-out positions.

BOS positions keep their own activation in the spliced and ablated runs alike (dictionaries are
trained with BOS skipped), and the predictions made at BOS positions are left out of every average, so
every number is over the same next-token predictions. From the mean next-token cross-entropies:

    CE recovered (baseline b) = (CE_b − CE_spliced) / (CE_b − CE_clean),   b = zero or mean ablation

(1 when splicing costs nothing, 0 when it is as bad as the ablation; reported for both baselines and
named), and the mean KL(clean ‖ spliced) of the next-token distributions. The same spliced run gives
L0, FVU, dead latents and the density histogram (`LatentStats`, as `evaluate`) over the non-BOS positions.

A crosscoder reads all its hook points at once, and an acausal one reconstructs an early layer from
later ones, which one forward pass has not computed when it reaches the early layer. It is measured
the way acausal crosscoders are: its reconstruction is computed from the clean run's activations at
every hook point, and the spliced run replaces each hook point by its part of that reconstruction
(the ablated runs replace every hook point, by zeros or by each one's mean). Where the hook points
are residual-stream states, the last one replaced is all the rest of the model reads.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from ..devices import batch_size_for, model_device
from .dictionary import Dictionary, DictionaryError
from .metrics import LatentStats
from .splice import splice


@dataclass
class SpliceMetrics:
    """The numbers `measure` returns; `save(path)` writes them as JSON, `rows()` as (name, value) pairs."""

    model: str
    hook_point: str              # the hook point written (a transcoder's target)
    architecture: str
    d_sae: int
    sequences: int
    predictions: int             # next-token predictions averaged over (non-BOS positions)
    ce_clean: float
    ce_spliced: float
    ce_zero_ablated: float
    ce_mean_ablated: float
    ce_recovered_zero: float     # baseline: zero ablation
    ce_recovered_mean: float     # baseline: mean ablation
    kl: float                    # mean KL(clean || spliced), nats
    l0: float
    fvu: float
    dead: int
    dead_fraction: float
    density_edges: list = field(default_factory=list)
    density_histogram: list = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    def save(self, path):
        from ..fileio import write_json

        return write_json(path, self.to_json())

    def rows(self) -> list[tuple[str, object]]:
        keys = ("ce_clean", "ce_spliced", "ce_zero_ablated", "ce_mean_ablated", "ce_recovered_zero",
                "ce_recovered_mean", "kl", "l0", "fvu", "dead", "dead_fraction", "predictions")
        return [(k, getattr(self, k)) for k in keys]


def ce_recovered(ce_ablated: float, ce_spliced: float, ce_clean: float) -> float:
    """(CE_ablated − CE_spliced) / (CE_ablated − CE_clean); nan when the ablation costs nothing."""
    gap = ce_ablated - ce_clean
    return (ce_ablated - ce_spliced) / gap if gap != 0 else math.nan


def _next_token_terms(logits: Tensor, tokens: Tensor, keep: Tensor, clean_logp: Tensor | None):
    """(Σ cross-entropy, Σ KL(clean ‖ this) or None, log-probs) over the predictions `keep` [b, pos-1]."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
    ce = nll[keep].to(torch.float64).sum()
    kl = None
    if clean_logp is not None:
        per = (clean_logp.exp() * (clean_logp - logp)).sum(-1)
        kl = per[keep].to(torch.float64).sum()
    return ce, kl, logp


def _check_tokens(tokens) -> Tensor:
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int):
        raise DictionaryError("tokens must be a [sequences, length] tensor of token ids (see training_tokens)")
    if tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise DictionaryError(f"held-out tokens of shape {tuple(tokens.shape)}: need at least one sequence of "
                              "two tokens or more")
    return tokens.long()


@torch.no_grad()
def measure(model, sae: Dictionary, tokens: Tensor, batch_size: int | None = None, keep_error: bool = False,
            progress: bool = False) -> SpliceMetrics:
    """The metrics of `sae` on `model` over the held-out `tokens` [n, length] (see the module's
    docstring). `batch_size`: sequences per forward pass (default: the model's). `keep_error=True`
    splices with the error term kept (a check: the spliced model is then the original, CE recovered 1
    and KL 0)."""
    from .activations import _enable
    from .splice import _bos_token

    tokens = _check_tokens(tokens)
    sae.check_model(model)
    c = sae.config
    cross = c.architecture == "crosscoder"
    written = c.out_hook_point if c.is_transcoder else c.hook_point
    points = list(c.hook_points) if cross else [written]  # the hook points replaced
    _enable(model, [c.hook_point, written] if not cross else points)
    device = model_device(model)
    step = batch_size_for(model, batch_size)
    bos = _bos_token(model)
    was_training = sae.training
    sae.eval()
    start = time.perf_counter()
    stats = LatentStats()
    sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "mean": 0.0, "kl": 0.0}
    act_sum: Tensor | None = None
    n_act = 0
    n_pred = 0
    chunks = [tokens[i:i + step] for i in range(0, tokens.shape[0], step)]

    def bos_mask(batch: Tensor) -> Tensor:
        if bos is None:
            mask = torch.zeros(batch.shape, dtype=torch.bool, device=batch.device)
            mask[:, 0] = True
            return mask
        return batch == bos

    def replace_with(value):
        def hook(act, hook):
            keep = untouched[..., None].to(act.device)
            flat = act.reshape(*act.shape[:2], -1)
            fill = value.to(act.dtype).expand_as(flat) if value is not None else torch.zeros_like(flat)
            return torch.where(keep, flat, fill).reshape(act.shape)
        return hook

    def replace_all(values):  # one value per replaced hook point (None: zeros)
        return [(p, replace_with(v)) for p, v in zip(points, values)]

    try:
        for i, chunk in enumerate(chunks):
            batch = chunk.to(device)
            untouched = bos_mask(batch)
            keep = ~untouched[:, :-1]
            n_pred += int(keep.sum())
            got: dict[str, Tensor] = {}

            def grab(name):
                def hook(act, hook):
                    got[name] = act.reshape(*act.shape[:2], -1)
                    return act
                return hook

            with model.hooks(fwd_hooks=[(p, grab(p)) for p in points]):
                ce, _, clean_logp = _next_token_terms(model(batch), batch, keep, None)
            sums["clean"] += float(ce)
            y = torch.stack([got[p] for p in points], -2)  # [b, pos, n_points, d]
            y_kept = y[~untouched].to(torch.float64)
            act_sum = y_kept.sum(0) if act_sum is None else act_sum + y_kept.sum(0)
            n_act += y_kept.shape[0]
            if cross:
                f = sae.encode(y.to(sae.dtype))
                recons = sae.decode(f)
                put = recons + (y - recons) if keep_error else recons
                with model.hooks(fwd_hooks=replace_all(put.unbind(-2))):
                    ce, kl, _ = _next_token_terms(model(batch), batch, keep, clean_logp)
                stats.update(y[~untouched], recons[~untouched], f[~untouched], 2)
            else:
                with splice(model, sae, keep_error=keep_error, check=False) as spliced:
                    spliced.set_tokens(batch)
                    names = [f"{written}.sae.hook_latents", f"{written}.sae.hook_recons"]
                    with model.hooks(fwd_hooks=[(names[0], grab("f")), (names[1], grab("recons"))]):
                        ce, kl, _ = _next_token_terms(model(batch), batch, keep, clean_logp)
                stats.update(y[..., 0, :][~untouched], got["recons"][~untouched], got["f"][~untouched])
            sums["spliced"] += float(ce)
            sums["kl"] += float(kl)
            with model.hooks(fwd_hooks=replace_all([None] * len(points))):
                sums["zero"] += float(_next_token_terms(model(batch), batch, keep, None)[0])
            if progress:
                print(f"measure: batch {i + 1}/{len(chunks)} (clean, spliced, zero-ablated)", file=sys.stderr)
        if n_pred == 0 or n_act == 0:
            raise DictionaryError("measure: the held-out tokens hold no position other than BOS")
        mean = (act_sum / n_act).to(torch.float32)
        for chunk in chunks:
            batch = chunk.to(device)
            untouched = bos_mask(batch)
            keep = ~untouched[:, :-1]
            with model.hooks(fwd_hooks=replace_all(mean.unbind(0))):
                sums["mean"] += float(_next_token_terms(model(batch), batch, keep, None)[0])
    finally:
        sae.train(was_training)
    ce = {k: v / n_pred for k, v in sums.items()}
    summary = stats.summary()
    return SpliceMetrics(
        model=str(getattr(model, "mechscope_name", None) or model.cfg.model_name), hook_point=",".join(points),
        architecture=c.architecture, d_sae=c.d_sae, sequences=int(tokens.shape[0]), predictions=n_pred,
        ce_clean=ce["clean"], ce_spliced=ce["spliced"], ce_zero_ablated=ce["zero"], ce_mean_ablated=ce["mean"],
        ce_recovered_zero=ce_recovered(ce["zero"], ce["spliced"], ce["clean"]),
        ce_recovered_mean=ce_recovered(ce["mean"], ce["spliced"], ce["clean"]), kl=ce["kl"],
        l0=summary["l0"], fvu=summary["fvu"], dead=summary["dead"], dead_fraction=summary["dead_fraction"],
        density_edges=summary["density_edges"], density_histogram=summary["density_histogram"],
        seconds=time.perf_counter() - start)
