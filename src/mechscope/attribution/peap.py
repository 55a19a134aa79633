"""Position-aware edge attribution patching, PEAP (../shared/method.md §3, §4; Haklay et al. 2025).

Within-position edges u@t -> v@t keep the EAP product per position; summed over the tokens of each span
of the schema (and over examples, divided by their number) they give span-level scores whose sum over
spans is the EAP score.

Crossing edges carry information between positions inside one attention head h: the key or value
input at position t' (t' <= t), or the query input at t, to h's output at t. Each is scored exactly
inside the head and linearly outside it:

    score(k@t' -> h@t) = (z_h^patched[t] - z_h[t]) . dM/dz_h[t]

where z^patched recomputes the head with only the key at t' replaced by its counterfactual value
(softmax over the patched scores, same causal and padding mask, the model's scale, rotated queries and
keys for rotary models). (z^patched - z) W_O . dM/dresult = (z^patched - z) . dM/dz, so the gradient is
taken at `hook_z`. Replacing one key changes one logit of row t, so the patched row is the old one
renormalised; in closed form, with a = p[t, t'], r = exp(s'[t, t'] - s[t, t']) and N = 1 - a + a r:

    z^patched[t] - z[t] = (1/N - 1) z[t] + a (r - 1) / N * v[t']

A value at t' changes z[t] by p[t, t'] (v'[t'] - v[t']); a query at t changes the whole row t.
"""

from __future__ import annotations

import math

import torch

from ..data.dataset import Batch
from ..metrics import compute_metric, final_logits


def _attention_hooks(model, layer: int) -> tuple[str, str]:
    """Names of the (rotated, if rotary) query and key hooks of a layer."""
    rot_q = f"blocks.{layer}.attn.hook_rot_q"
    if rot_q in model.hook_dict:
        return rot_q, f"blocks.{layer}.attn.hook_rot_k"
    return f"blocks.{layer}.attn.hook_q", f"blocks.{layer}.attn.hook_k"


def attention_scale(model) -> float:
    """The factor attention scores are multiplied by (1 / sqrt(d_head) unless the model says else)."""
    cfg = model.cfg
    scale = getattr(cfg, "attn_scale", None)
    if scale is None or scale <= 0:
        scale = math.sqrt(cfg.d_head)
    return 1.0 / float(scale)


def _capture(model, batch: Batch, tokens: torch.Tensor, metric: str | None):
    """Run `tokens`, capturing per layer q, k, v, z (and dM/dz when `metric` is given)."""
    cache: dict[str, torch.Tensor] = {}
    names = []
    for l in range(model.cfg.n_layers):
        q, k = _attention_hooks(model, l)
        names += [q, k, f"blocks.{l}.attn.hook_v", f"blocks.{l}.attn.hook_z"]

    def keep(value, hook):
        if metric is not None and hook.name.endswith("hook_z") and not value.requires_grad:
            value = value.detach().requires_grad_(True)
        cache[hook.name] = value
        return value

    grads = {}
    with torch.set_grad_enabled(metric is not None), model.hooks(fwd_hooks=[(n, keep) for n in names]):
        logits = model(tokens, attention_mask=batch.attention_mask)
        if metric is not None:
            final = final_logits(logits, batch.last)
            m = compute_metric(metric, final, batch, clean_logits=final.detach())
            z_names = [f"blocks.{l}.attn.hook_z" for l in range(model.cfg.n_layers)]
            found = torch.autograd.grad(m.sum(), [cache[n] for n in z_names], allow_unused=True)
            for name, g in zip(z_names, found):
                grads[name] = torch.zeros_like(cache[name]) if g is None else g
    return {k: v.detach() for k, v in cache.items()}, grads


def _per_query_head(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[b, t, kv_heads, d] -> [b, heads, t, d], repeating each key-value head over its query group."""
    return x.repeat_interleave(n_heads // x.shape[2], dim=2).transpose(1, 2).double()


@torch.no_grad()
def crossing_scores(model, batch: Batch, metric: str) -> dict[str, torch.Tensor]:
    """Crossing-edge scores of one batch, summed over nothing yet (per example):

    k, v: [batch, layer, head, t (query position), t' (key position)], zero unless t' <= t and t' is
    not padding; q: [batch, layer, head, t]. Counterfactual reference (the paired prompt's q, k, v).
    """
    clean, grads = _capture(model, batch, batch.clean, metric)
    cf, _ = _capture(model, batch, batch.counterfactual, None)
    cfg = model.cfg
    n_layers, n_heads = cfg.n_layers, cfg.n_heads
    b, t = batch.clean.shape
    scale = attention_scale(model)
    causal = torch.ones(t, t, dtype=torch.bool, device=batch.clean.device).tril()
    allowed = causal[None, None] & batch.attention_mask.bool()[:, None, None, :]  # [b, 1, t, t']
    out = {
        "k": torch.zeros(b, n_layers, n_heads, t, t, dtype=torch.float64),
        "v": torch.zeros(b, n_layers, n_heads, t, t, dtype=torch.float64),
        "q": torch.zeros(b, n_layers, n_heads, t, dtype=torch.float64),
    }
    for l in range(n_layers):
        qn, kn = _attention_hooks(model, l)
        vn, zn = f"blocks.{l}.attn.hook_v", f"blocks.{l}.attn.hook_z"
        q, q2 = clean[qn].transpose(1, 2).double(), cf[qn].transpose(1, 2).double()  # [b, h, t, d]
        k, k2 = _per_query_head(clean[kn], n_heads), _per_query_head(cf[kn], n_heads)
        v, v2 = _per_query_head(clean[vn], n_heads), _per_query_head(cf[vn], n_heads)
        gz = grads[zn].transpose(1, 2).double()  # [b, h, t, d_head]
        s = torch.einsum("bhtd,bhjd->bhtj", q, k) * scale
        s = s.masked_fill(~allowed, float("-inf"))
        p = s.softmax(-1)
        z = p @ v  # [b, h, t, d_head]
        zg = (z * gz).sum(-1, keepdim=True)  # [b, h, t, 1]
        vg = torch.einsum("bhjd,bhtd->bhtj", v, gz)  # v[t'] . dM/dz[t]
        # Key at t' replaced: the one changed logit of row t moves by s'[t, t'] - s[t, t'].
        s_k = (torch.einsum("bhtd,bhjd->bhtj", q, k2) * scale).masked_fill(~allowed, float("-inf"))
        r = torch.exp((s_k - s).masked_fill(~allowed, 0.0))
        norm = 1.0 - p + p * r
        key = (1.0 / norm - 1.0) * zg + p * (r - 1.0) / norm * vg
        out["k"][:, l] = key.masked_fill(~allowed, 0.0).cpu()
        # Value at t' replaced: z[t] moves by p[t, t'] (v'[t'] - v[t']).
        dvg = torch.einsum("bhjd,bhtd->bhtj", v2 - v, gz)
        out["v"][:, l] = (p * dvg).masked_fill(~allowed, 0.0).cpu()
        # Query at t replaced: row t is recomputed.
        s_q = (torch.einsum("bhtd,bhjd->bhtj", q2, k) * scale).masked_fill(~allowed, float("-inf"))
        dz = (s_q.softmax(-1) - p) @ v
        out["q"][:, l] = (dz * gz).sum(-1).masked_fill(~batch.attention_mask.bool()[:, None, :], 0.0).cpu()
    return out


def span_one_hot(span_of: torch.Tensor, n_spans: int) -> torch.Tensor:
    """[batch, pos] span ids (-1 for padding) -> [batch, pos, n_spans] float one-hot."""
    out = torch.zeros(*span_of.shape, n_spans, dtype=torch.float64)
    real = span_of >= 0
    out[real, span_of[real]] = 1.0
    return out


def aggregate_crossing(scores: dict[str, torch.Tensor], span_of: torch.Tensor, n_spans: int) -> dict[str, torch.Tensor]:
    """Sum crossing scores over examples and over the tokens of each span pair:
    k, v: [layer, head, key span, query span]; q: [layer, head, query span]."""
    onehot = span_one_hot(span_of, n_spans)  # [b, t, s]
    return {
        "k": torch.einsum("bjk,blhtj,btq->lhkq", onehot, scores["k"], onehot),
        "v": torch.einsum("bjk,blhtj,btq->lhkq", onehot, scores["v"], onehot),
        "q": torch.einsum("blht,btq->lhq", scores["q"], onehot),
    }


def batch_span_of(dataset, indices, width: int) -> torch.Tensor:
    """[batch, width] span id of every token of the examples `indices` (-1 for padding)."""
    out = torch.full((len(indices), width), -1, dtype=torch.long)
    for row, i in enumerate(indices):
        ids = dataset.examples[i].span_of_positions()
        out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def concrete_counts(dataset, n_spans: int) -> dict[str, torch.Tensor]:
    """Token-level edges a span edge stands for, averaged over examples (method.md §4):
    within: [span] = |S|; crossing: [key span, query span] = number of (t', t) with t' <= t."""
    within = torch.zeros(n_spans, dtype=torch.float64)
    crossing = torch.zeros(n_spans, n_spans, dtype=torch.float64)
    for ex in dataset.examples:
        spans = torch.tensor(ex.span_of_positions())
        onehot = torch.nn.functional.one_hot(spans, n_spans).double()  # [t, s]
        within += onehot.sum(0)
        causal = torch.ones(len(spans), len(spans), dtype=torch.float64).tril()  # [t, t']
        crossing += torch.einsum("jk,tj,tq->kq", onehot, causal, onehot)
    n = max(1, len(dataset))
    return {"within": within / n, "crossing": crossing / n}

