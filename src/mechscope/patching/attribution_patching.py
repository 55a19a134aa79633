"""Attribution patching: the first-order estimate of an activation patching sweep (docs/method.md §3, §9).

For every instance of the component, the change in M when it is patched is estimated as
    (a_source − a_run) · ∂M/∂a   (summed over the instance's entries),
with the gradient taken on the run the patches are made in (the clean prompt for noising, x' for
denoising) and a_source what `patch_sweep` would patch in. One forward and one backward per batch of
examples give every instance of every layer. Values have the axes of `patch_sweep` and are normalised
the same way, with M_patched ≈ M_run + estimate.
"""

from __future__ import annotations

import torch

from ..behaviour import check_compatible
from ..data.dataset import PromptPairDataset
from ..devices import model_device
from ..errors import check_count
from ..metrics import Metric, compute_metric, resolve_metric
from .result import PatchResult
from .sweep import (
    _Instances, _prepare, _result, axes_of, check_sweep, last_logits, mean_activations, n_heads_of,
    resample_partners, sources,
)


def _run_gradients(model, spec, tokens, batch, metric, clean_logits) -> tuple[dict, dict]:
    """(activation, ∂ sum M / ∂ activation) per layer at the component, on `tokens`."""
    acts: dict = {}

    def keep(name):
        def hook(value, hook=None):
            acts[name] = value
            return value

        return hook

    def leaf(value, hook=None):  # everything after the embedding joins the autograd graph
        return value.detach().requires_grad_(True)

    hooks = [("blocks.0.hook_resid_pre", leaf)] + [(spec.name(l), keep(spec.name(l))) for l in spec.layers]
    with torch.enable_grad():
        logits = last_logits(model, tokens, batch.attention_mask, batch.last, hooks)
        m = compute_metric(metric, logits, batch, clean_logits=clean_logits)
        names = [spec.name(l) for l in spec.layers]
        grads = torch.autograd.grad(m.sum(), [acts[n] for n in names], allow_unused=True)
    return ({l: acts[n].detach() for l, n in zip(spec.layers, names)},
            {l: (g if g is not None else torch.zeros_like(acts[n])) for l, n, g in zip(spec.layers, names, grads)})


def contract(spec, inst: _Instances, delta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """[batch, n_instances] sum over each instance's entries of delta * grad ([batch, ...] tensors)."""
    prod = (delta * grad).float()
    g = inst.groups.float()  # [b, P, t]
    heads = inst.heads_t
    if spec.shape == "pos":
        return torch.einsum("bpt,bt->bp", g, prod.sum(-1))
    if spec.shape == "head_pos":
        per = prod.sum(-1)[:, :, heads]  # [b, t, H]
        return torch.einsum("bpt,bth->bhp", g, per).reshape(prod.shape[0], -1)
    if spec.component == "pattern":
        return prod.sum((-1, -2))[:, heads]
    return prod.sum((1, 3))[:, heads]


def attribution_sweep(model, dataset: PromptPairDataset, component: str = "z_pos", direction: str = "noising",
                      reference: str = "counterfactual", positions: str = "span", metric: Metric | None = None,
                      layers=None, heads=None, batch_size: int = 16, seed: int = 0,
                      reference_data: PromptPairDataset | None = None) -> PatchResult:
    """The attribution-patching estimate of `patch_sweep(...)` with the same arguments (module docstring)."""
    spec = check_sweep(model, dataset, component, direction, reference, positions, layers, heads, reference_data)
    batch_size = check_count("batch_size", batch_size)
    check_compatible(model, dataset)
    metric = resolve_metric(metric, dataset)
    device = model_device(model)
    heads_list = spec.heads if spec.heads is not None else list(range(n_heads_of(model, component)))
    partners = resample_partners(dataset, reference_data, seed) if reference == "resample" else None
    mean = mean_activations(model, spec, reference_data or dataset, batch_size) if reference == "mean" else None
    axes, labels = axes_of(model, dataset, spec)
    raw_parts, clean_parts, cf_parts = [], [], []
    for idx, batch in dataset.batches(batch_size):
        batch = batch.to(device)
        with torch.no_grad():
            base = _prepare(model, spec, dataset, idx, batch, metric)
            src = sources(model, spec, dataset, idx, batch, base.clean_acts, base.groups, mean, partners,
                          reference_data)
        tokens = batch.clean if spec.direction == "noising" else batch.counterfactual
        run_acts, grads = _run_gradients(model, spec, tokens, batch, metric, base.clean_logits)
        inst = _Instances(spec, base.groups, heads_list, n_heads_of(model, component))
        est = torch.stack([contract(spec, inst, src[l].to(run_acts[l].dtype) - run_acts[l], grads[l])
                           for l in spec.layers], 1)  # [b, L, n]
        raw = base.metric.float()[:, None, None] + est
        raw_parts.append(raw.reshape(len(idx), len(spec.layers), *inst.cells).detach().cpu())
        clean_parts.append(base.m_clean.cpu())
        cf_parts.append(base.m_cf.cpu())
    return _result(spec, raw_parts, clean_parts, cf_parts, axes, labels, model, dataset, metric, seed,
                   {"estimate": "attribution_patching"})


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two tensors of the same shape (ties get their mean rank; NaN cells
    of either are left out)."""
    x, y = a.reshape(-1).double(), b.reshape(-1).double()
    ok = x.isfinite() & y.isfinite()
    x, y = x[ok], y[ok]
    if x.numel() < 2:
        return float("nan")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.norm() * ry.norm()).item()
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def _ranks(x: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(x)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype, device=x.device)
    uniq, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=x.dtype, device=x.device).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(uniq), dtype=x.dtype, device=x.device).index_add_(0, inverse, torch.ones_like(ranks))
    return (sums / counts)[inverse]
