"""Features in circuits: attribution to a spliced dictionary's latents and error (docs/method.md §3, §4, §11).

With a dictionary spliced at hook point H and its error kept (`splice(..., keep_error=True)`), the
model computes its original function while the activation at H is written as x = W_dec f + b_dec + e:
each latent f_i and the error vector e is a node. `attribute_latents` gives every node an EAP score
per example and position,

    latent i at t:  (f_i[t] − f_i_ref[t]) · ∂M/∂f_i[t]       error at t:  (e[t] − e_ref[t]) · ∂M/∂e[t]

with the gradients taken on the clean run (the splice makes ∂M/∂f the partial W_dec·∂M/∂x and
∂M/∂e = ∂M/∂x), and sums the token scores over the dataset's schema spans and examples, divided by the
number of examples, as PEAP's `sum` aggregation does (attribution/aggregation.py): scores
[n_spans, d_sae] and error [n_spans] per hook point.

References (`ablation`), as for the graph's nodes (attribution/references.py):
  * counterfactual: the latents and error on the example's counterfactual prompt;
  * mean: their per-position mean over the clean prompts of `reference` (default the dataset);
  * zero: the hook point's activation set to 0, i.e. the latents at 0 and the error at the part of that
    zero the latents do not reconstruct, e_ref = 0 − decode(0) = −b_dec.
In every case e_ref = x_ref − decode(f_ref), so, x being linear in (f, e), at every position the
latents' scores plus the error's score equal the EAP score of the hook point itself,
(x − x_ref) · ∂M/∂x (for a skip transcoder, x less its skip term). The tests check that identity.

`faithfulness` keeps chosen (span, latent) nodes and the error at their clean values and patches every
other latent to its reference, giving the metric of that feature circuit; `feature_curve` does it for
the top n nodes by |score| over several n.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..attribution.peap import batch_span_of, span_one_hot
from ..attribution.references import _PositionMean, check_ablation
from ..behaviour import check_compatible
from ..data.dataset import Batch, PromptPairDataset
from ..devices import HOST, batch_size_for, model_device
from ..errors import ParameterError, check_finite
from ..metrics import Metric, compute_metric, final_logits, metric_name, resolve_metric
from .dictionary import Dictionary
from .splice import ERROR, LATENTS, _as_list, splice


@dataclass
class LatentScores:
    """Span-level EAP scores of a dictionary's nodes, per hook point written: `latents[H]` [n_spans, d_sae],
    `error[H]` [n_spans] (float64, on the host)."""

    latents: dict[str, Tensor]
    error: dict[str, Tensor]
    spans: tuple[str, ...]
    metric: str
    ablation: str
    n_examples: int
    hook_points: list[str] = field(default_factory=list)

    def node_total(self, hook_point: str | None = None) -> Tensor:
        """[n_spans]: latents + error per span, the hook point's own EAP score per span."""
        h = self._point(hook_point)
        return self.latents[h].sum(-1) + self.error[h]

    def _point(self, hook_point: str | None) -> str:
        if hook_point is None:
            if len(self.hook_points) != 1:
                raise ParameterError(f"several hook points scored; name one of {', '.join(self.hook_points)}")
            return self.hook_points[0]
        if hook_point not in self.latents:
            raise ParameterError(f"no scores at '{hook_point}'; scored: {', '.join(self.hook_points)}")
        return hook_point


def _written(sae: Dictionary) -> str:
    c = sae.config
    return c.out_hook_point if c.is_transcoder else c.hook_point


class _Recorder:
    """Forward hooks on the splice's latent and error points that record (and, with `replace`, overwrite)
    their values per hook point written."""

    def __init__(self, state, replace: dict | None = None, grad: bool = False):
        self.state, self.replace, self.grad = state, replace or {}, grad
        self.values: dict[str, Tensor] = {}

    def hooks(self) -> list:
        pairs = []
        for site in self.state.sites:
            for suffix in (LATENTS, ERROR):
                pairs.append((f"{site.writes}.{suffix}", self._hook(f"{site.writes}.{suffix}")))
        return pairs

    def _hook(self, name: str):
        def hook(value, hook=None):
            if name in self.replace:
                value = self.replace[name](value)
            if self.grad and not value.requires_grad:
                value.requires_grad_(True)
            self.values[name] = value
            return value
        return hook


def _forward_last(model, state, tokens: Tensor, batch: Batch, hooks: list) -> Tensor:
    """Final logits [b, vocab] at each example's last token, the splice told the tokens."""
    state.set_tokens(tokens)
    with model.hooks(fwd_hooks=hooks):
        logits = model(tokens, attention_mask=batch.attention_mask)
    return final_logits(logits, batch.last)


def _zero_error(sae: Dictionary, like: Tensor) -> Tensor:
    """The error reference of zero ablation, −decode(0), broadcast like `like` [b, t, d]."""
    zeros = torch.zeros(1, sae.config.d_sae, dtype=sae.dtype, device=like.device)
    return (-sae.decode(zeros)).to(like.dtype).reshape(1, 1, -1).expand_as(like)


@torch.no_grad()
def mean_latents(model, saes, dataset: PromptPairDataset, batch_size: int | None = None) -> dict[str, Tensor]:
    """Per hook point written, the per-position mean of [latents, error] over the clean prompts of
    `dataset`: a `MeanReference`-style object whose `rows(n_pos)` is [1, n_pos, d_sae + d]."""
    items = _as_list(saes)
    device = model_device(model)
    means = {_written(s): _PositionMean() for s in items}
    with splice(model, items, keep_error=True) as state:
        for _, batch in dataset.batches(batch_size_for(model, batch_size)):
            batch = batch.to(device)
            rec = _Recorder(state)
            _forward_last(model, state, batch.clean, batch, rec.hooks())
            for h, m in means.items():
                both = torch.cat([rec.values[f"{h}.{LATENTS}"], rec.values[f"{h}.{ERROR}"]], -1)
                m.add(both[None].float(), batch.attention_mask)
    return {h: m.result() for h, m in means.items()}


def references(model, state, saes: Sequence[Dictionary], batch: Batch, ablation: str, clean: dict[str, Tensor],
               mean: dict | None = None) -> dict[str, Tensor]:
    """Reference values of every latent and error node for `batch`, keyed like `clean` (the splice's hook
    names), each shaped like its clean value."""
    out = {}
    if ablation == "counterfactual":
        with torch.no_grad():
            rec = _Recorder(state)
            _forward_last(model, state, batch.counterfactual, batch, rec.hooks())
        return {k: v.detach() for k, v in rec.values.items()}
    for sae in saes:
        h = _written(sae)
        f, e = clean[f"{h}.{LATENTS}"], clean[f"{h}.{ERROR}"]
        if ablation == "zero":
            out[f"{h}.{LATENTS}"] = torch.zeros_like(f)
            with torch.no_grad():
                out[f"{h}.{ERROR}"] = _zero_error(sae, e)
        else:
            if mean is None or h not in mean:
                raise ParameterError("mean ablation needs mean_latents(...) of the same dictionaries")
            rows = mean[h].rows(f.shape[1])[0].to(f.device, f.dtype)  # [t, d_sae + d]
            out[f"{h}.{LATENTS}"] = rows[None, :, : f.shape[-1]].expand_as(f)
            out[f"{h}.{ERROR}"] = rows[None, :, f.shape[-1]:].expand_as(e)
    return out


def token_scores(model, saes, batch: Batch, metric: Metric, ablation: str = "counterfactual",
                 mean: dict | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Per hook point written, (latent scores [b, t, d_sae], error scores [b, t]) of one batch: the
    token-level EAP scores before aggregation (padding positions score 0)."""
    items = _as_list(saes)
    check_ablation(ablation)
    with splice(model, items, keep_error=True) as state:
        with torch.enable_grad():
            rec = _Recorder(state, grad=True)
            final = _forward_last(model, state, batch.clean, batch, rec.hooks())
            m = compute_metric(metric, final, batch, clean_logits=final.detach())
            names = list(rec.values)
            grads = torch.autograd.grad(m.sum(), [rec.values[n] for n in names], allow_unused=True)
        clean = {n: rec.values[n].detach() for n in names}
        grad = {n: torch.zeros_like(clean[n]) if g is None else g.detach() for n, g in zip(names, grads)}
        ref = references(model, state, items, batch, ablation, clean, mean)
    keep = batch.attention_mask.to(batch.clean.device)
    out = {}
    for sae in items:
        h = _written(sae)
        lat, err = f"{h}.{LATENTS}", f"{h}.{ERROR}"
        s_lat = (clean[lat] - ref[lat]) * grad[lat] * keep[..., None]
        s_err = ((clean[err] - ref[err]) * grad[err]).sum(-1) * keep
        out[h] = (s_lat, s_err)
    return out


def _setup(model, saes, dataset, ablation, metric, batch_size):
    """Checked (dictionaries, metric, batch size, device) shared by the entry points."""
    check_ablation(ablation)
    items = _as_list(saes)
    check_compatible(model, dataset)
    return items, resolve_metric(metric, dataset), batch_size_for(model, batch_size), model_device(model)


def attribute_latents(model, saes, dataset: PromptPairDataset, ablation: str = "counterfactual", *,
                      batch_size: int | None = None, progress: bool = True, metric: Metric | None = None,
                      reference: PromptPairDataset | None = None, aggregation: str = "sum") -> LatentScores:
    """EAP scores of every latent and error node of `saes` (one Dictionary or several, spliced with their
    error kept) per schema span of `dataset`: the token scores summed over each span's tokens and over the
    examples, divided by the number of examples (PEAP's `sum`; summed over spans it is EAP). See the
    module's docstring for the references; `reference` is the set the mean is taken over."""
    if aggregation != "sum":
        raise ParameterError(f"latent scores aggregate with 'sum' only, not '{aggregation}'")
    items, metric, batch_size, device = _setup(model, saes, dataset, ablation, metric, batch_size)
    mean = mean_latents(model, items, reference or dataset, batch_size) if ablation == "mean" else None
    n_spans = len(dataset.schema)
    points = [_written(s) for s in items]
    lat_total = {h: None for h in points}
    err_total = {h: None for h in points}
    bar = tqdm(total=len(dataset), desc="latent attribution", unit="ex", disable=not progress)
    for indices, batch in dataset.batches(batch_size):
        batch = batch.to(device)
        scores = token_scores(model, items, batch, metric, ablation, mean)
        onehot = span_one_hot(batch_span_of(dataset, indices, batch.clean.shape[1], device), n_spans)
        for h, (s_lat, s_err) in scores.items():
            oh = onehot.to(s_lat.dtype)
            lat = torch.einsum("bts,bti->si", oh, s_lat).double().cpu()
            err = torch.einsum("bts,bt->s", oh, s_err).double().cpu()
            lat_total[h] = lat if lat_total[h] is None else lat_total[h] + lat
            err_total[h] = err if err_total[h] is None else err_total[h] + err
        bar.update(len(indices))
    bar.close()
    n = len(dataset)
    latents = {h: v / n for h, v in lat_total.items()}
    error = {h: v / n for h, v in err_total.items()}
    hint = "the metric or the model's activations are not finite on this dataset"
    for h in points:
        check_finite(latents[h], f"latent scores at {h}", hint)
        check_finite(error[h], f"error scores at {h}", hint)
    return LatentScores(latents, error, tuple(dataset.schema.spans), metric_name(metric), ablation, n, points)


def top_features(scores: LatentScores, n: int, hook_point: str | None = None) -> Tensor:
    """[n_spans, d_sae] bool: the `n` (span, latent) nodes of largest |score| at `hook_point` (ties broken
    by order)."""
    h = scores._point(hook_point)
    values = scores.latents[h]
    if n < 0:
        raise ParameterError(f"n must be >= 0, not {n}")
    keep = torch.zeros(values.numel(), dtype=torch.bool, device=HOST)
    keep[values.abs().flatten().argsort(descending=True, stable=True)[: min(n, values.numel())]] = True
    return keep.view_as(values)


def _patcher(ref: Tensor, keep: Tensor, span_of: Tensor):
    """Replace a node's value with `ref` at the positions and latents `keep` [n_spans, width] or [n_spans]
    leaves out."""

    def patch(value: Tensor) -> Tensor:
        spans = span_of.clamp(min=0)
        mask = keep.to(value.device)[spans]  # [b, t, width] or [b, t]
        if mask.dim() == 2:
            mask = mask[..., None]
        mask = mask | (span_of < 0)[..., None]  # padding keeps its value
        return torch.where(mask, value, ref.to(value.dtype))
    return patch


@torch.no_grad()
def faithfulness(model, saes, dataset: PromptPairDataset, keep: dict[str, Tensor], keep_error: bool | dict = True,
                 ablation: str = "counterfactual", *, batch_size: int | None = None, metric: Metric | None = None,
                 mean: dict | None = None, reference: PromptPairDataset | None = None) -> float:
    """Mean metric over `dataset` of the feature circuit: at each hook point H written by `saes`, the
    (span, latent) nodes `keep[H]` [n_spans, d_sae] (bool) keep their clean values, the others take their
    reference (`ablation`, as `attribute_latents`); the error keeps its clean value where `keep_error`
    (True, False, or per H a [n_spans] bool) says so, else takes its reference."""
    items, metric, batch_size, device = _setup(model, saes, dataset, ablation, metric, batch_size)
    n_spans = len(dataset.schema)
    if ablation == "mean" and mean is None:
        mean = mean_latents(model, items, reference or dataset, batch_size)
    masks = {}
    for sae in items:
        h = _written(sae)
        if h not in keep or tuple(keep[h].shape) != (n_spans, sae.config.d_sae):
            raise ParameterError(f"keep['{h}'] must be a bool tensor [{n_spans}, {sae.config.d_sae}]")
        err = keep_error.get(h, True) if isinstance(keep_error, dict) else keep_error
        err = torch.full((n_spans,), bool(err), dtype=torch.bool, device=HOST) if isinstance(err, bool) else err
        masks[h] = (keep[h].bool(), err.bool())
    total = 0.0
    with splice(model, items, keep_error=True) as state:
        for indices, batch in dataset.batches(batch_size):
            batch = batch.to(device)
            rec = _Recorder(state)
            clean_final = _forward_last(model, state, batch.clean, batch, rec.hooks())
            ref = references(model, state, items, batch, ablation, rec.values, mean)
            span_of = batch_span_of(dataset, indices, batch.clean.shape[1], device)
            replace = {}
            for h, (lat, err) in masks.items():
                replace[f"{h}.{LATENTS}"] = _patcher(ref[f"{h}.{LATENTS}"], lat, span_of)
                replace[f"{h}.{ERROR}"] = _patcher(ref[f"{h}.{ERROR}"], err, span_of)
            patched = _forward_last(model, state, batch.clean, batch, _Recorder(state, replace).hooks())
            total += float(compute_metric(metric, patched, batch, clean_logits=clean_final).double().sum())
    return total / len(dataset)


def feature_curve(model, saes, dataset: PromptPairDataset, scores: LatentScores, ns: Sequence[int],
                  keep_error: bool = True, **kw) -> list[tuple[int, float]]:
    """[(n, metric)] of `faithfulness` keeping the top n (span, latent) nodes by |score| at each hook point
    (and the error where `keep_error`), for each n of `ns`."""
    items = _as_list(saes)
    kw.setdefault("ablation", scores.ablation)
    if kw["ablation"] == "mean" and kw.get("mean") is None:  # one mean for every point of the curve
        kw["mean"] = mean_latents(model, items, kw.pop("reference", None) or dataset, kw.get("batch_size"))
    return [(n, faithfulness(model, items, dataset, {_written(s): top_features(scores, n, _written(s)) for s in items},
                             keep_error, **kw)) for n in ns]
