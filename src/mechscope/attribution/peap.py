"""Position-aware edge attribution patching, PEAP (docs/method.md §3, §4; Haklay et al. 2025).

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

A value at t' changes z[t] by p[t, t'] (v'[t'] - v[t']).

The query edge is per key as well (the PEAP paper's patched query): q@t -> h@t against key t' puts the
counterfactual query q'[t] into the one score s[t, t'] and keeps the rest of row t clean, so it has the
key edge's closed form with r = exp(s_q[t, t'] - s[t, t']), s_q = scores(q', k). It is indexed like k
and v, [.., t, t'], and aggregates to [key span, query span]. `query_edges="whole_row"` instead
replaces the query in every score of row t at once (a coarser edge, indexed by t alone):
z^patched[t] - z[t] = (softmax(s_q[t]) - p[t]) v.
"""

from __future__ import annotations

import torch

from ..data.dataset import Batch
from ..devices import HOST
from ..errors import ParameterError
from ..graph import Graph
from ..metrics import compute_metric, final_logits
from .attention import (
    allowed_mask,
    attention_scale,
    check_supported,
    is_causal,
    per_query_head,
    qkv_hook_names,
    score_soft_cap,
    scores,
)
from .post_norm import frozen_scale_hooks, head_write_weights

QUERY_EDGES = ("per_key", "whole_row")


def check_query_edges(query_edges: str) -> str:
    """ParameterError unless `query_edges` is one of QUERY_EDGES: `per_key` (the default, the PEAP
    paper's query edge: one (query, key) score patched) or `whole_row` (the query patched in every
    score of its row at once)."""
    if query_edges not in QUERY_EDGES:
        raise ParameterError(f"unknown query_edges '{query_edges}'; choose one of {', '.join(QUERY_EDGES)}")
    return query_edges


def pair_kinds(scores: dict[str, torch.Tensor], pair_dims: int) -> tuple[str, ...]:
    """The crossing-edge kinds of `scores` indexed by a (key, query) pair: k and v, and q unless its
    query edges are whole rows (then q has one dimension fewer than k: `pair_dims` is k's number)."""
    return ("k", "v", "q") if scores["q"].dim() == pair_dims else ("k", "v")


def _capture(model, batch: Batch, tokens: torch.Tensor, metric: str | None):
    """Run `tokens`, capturing per layer (q, k, v), z and (when `metric` is given) dM/dz."""
    attn: dict[int, list] = {}
    z: dict[int, torch.Tensor] = {}
    hooks = []
    for l in range(model.cfg.n_layers):
        for slot, name in enumerate(qkv_hook_names(model, l)):
            hooks.append((name, lambda value, hook, l=l, slot=slot: attn.setdefault(l, [None] * 3).__setitem__(
                slot, value.detach()) or value))

        def keep_z(value, hook, l=l):
            if metric is not None and not value.requires_grad:
                value = value.detach().requires_grad_(True)
            z[l] = value
            return value

        hooks.append((f"blocks.{l}.attn.hook_z", keep_z))
    grads = {}
    if metric is not None:  # dM/dz with the post-sublayer norms' scales held fixed (post_norm.py)
        hooks = frozen_scale_hooks(model, model.cfg.n_layers) + hooks
    with torch.set_grad_enabled(metric is not None), model.hooks(fwd_hooks=hooks):
        logits = model(tokens, attention_mask=batch.attention_mask)
        if metric is not None:
            final = final_logits(logits, batch.last)
            m = compute_metric(metric, final, batch, clean_logits=final.detach())
            layers = sorted(z)
            found = torch.autograd.grad(m.sum(), [z[l] for l in layers], allow_unused=True)
            grads = {l: torch.zeros_like(z[l]) if g is None else g for l, g in zip(layers, found)}
    return attn, {l: v.detach() for l, v in z.items()}, grads


@torch.no_grad()
def crossing_scores(model, batch: Batch, metric: str, query_edges: str = "per_key") -> dict[str, torch.Tensor]:
    """Crossing-edge scores of one batch, per example, from passes of their own (the attribution
    path reuses the EAP passes through `crossing_from_runs`):

    k, v, q: [batch, layer, head, t (query position), t' (key position)], zero unless t' <= t and t'
    is not padding; with `query_edges="whole_row"` q is [batch, layer, head, t]. Counterfactual
    reference (the paired prompt's q, k, v).
    """
    check_query_edges(query_edges)
    clean, z, gz = _capture(model, batch, batch.clean, metric)
    cf, _, _ = _capture(model, batch, batch.counterfactual, None)
    return crossing_from_runs(model, batch.attention_mask, clean, cf, z, gz, query_edges)


def head_output_grads(model, graph: Graph, grad: torch.Tensor,
                      inv_scale: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
    """dM/dz per layer [batch, pos, head, d_head] from the downstream-input gradients [n_down, b, t, d].

    A head's write enters the residual stream once and every later reader sees it, so dM/dwrite_h is
    the sum of the gradients at all downstream inputs read after the head writes; times W_O[h]^T it
    is dM/dz_h. One running sum from the logits down serves every layer. With post-sublayer norms
    the write is w1 * (z_h @ W_O[h]) / r with r frozen (post_norm.py), so the chain rule also takes
    the weight w1 and the clean run's 1 / r, given per layer in `inv_scale` ([b, t, 1, 1]).
    """
    W_O = head_write_weights(model)
    steps = graph.downstream_read_step.tolist()
    running = torch.zeros_like(grad[0])
    nxt = graph.n_downstream  # downstream nodes [nxt, n_down) are in `running`
    out = {}
    for l in range(graph.n_layers - 1, -1, -1):
        first = next(i for i, s in enumerate(steps) if s >= 2 * l + 1)
        if first < nxt:
            running += grad[first:nxt].sum(0)
            nxt = first
        out[l] = torch.einsum("btd,hed->bthe", running, W_O[l].to(running.dtype))
        if inv_scale is not None and l in inv_scale:
            out[l] = out[l] * inv_scale[l].to(out[l].dtype)
    return out


@torch.no_grad()
def crossing_from_runs(model, attention_mask, clean, cf, z, gz, query_edges: str = "per_key") -> dict[str, torch.Tensor]:
    """Crossing-edge scores from captured clean and counterfactual (q, k, v) per layer, the clean z and
    dM/dz per layer ([batch, pos, head, d_head]); shapes as `crossing_scores` gives them."""
    per_key = check_query_edges(query_edges) == "per_key"
    cfg = model.cfg
    n_layers, n_heads = cfg.n_layers, cfg.n_heads
    b, t = attention_mask.shape
    check_supported(model, t)
    scale, cap = attention_scale(model), score_soft_cap(model)
    allowed = allowed_mask(attention_mask, is_causal(model))  # [b, 1, t, t']
    # Kept on the model's device: moving each layer to the host would wait for the GPU 3x a layer.
    dev = attention_mask.device
    out = {
        "k": torch.zeros(b, n_layers, n_heads, t, t, dtype=torch.float64, device=dev),
        "v": torch.zeros(b, n_layers, n_heads, t, t, dtype=torch.float64, device=dev),
        "q": torch.zeros(b, n_layers, n_heads, t, *((t,) if per_key else ()), dtype=torch.float64, device=dev),
    }

    def one_logit_changed(s_new, p, s, zg, vg):
        """Change of z[t] . dM/dz[t] when only the logit s[t, t'] becomes s_new[t, t'], per (t, t'):
        row t renormalised, with a = p[t, t'], r = exp(s_new - s), N = 1 - a + a r."""
        r = torch.exp((s_new - s).masked_fill(~allowed, 0.0))
        norm = 1.0 - p + p * r
        return ((1.0 / norm - 1.0) * zg + p * (r - 1.0) / norm * vg).masked_fill(~allowed, 0.0)

    for l in range(n_layers):
        (q, k, v), (q2, k2, v2) = clean[l], cf[l]
        q, q2 = q.transpose(1, 2).double(), q2.transpose(1, 2).double()  # [b, h, t, d]
        k, k2 = per_query_head(k, n_heads).double(), per_query_head(k2, n_heads).double()
        v, v2 = per_query_head(v, n_heads).double(), per_query_head(v2, n_heads).double()
        gzl = gz[l].transpose(1, 2).double()  # [b, h, t, d_head]
        zl = z[l].transpose(1, 2).double()
        s = scores(q, k, scale, cap).masked_fill(~allowed, float("-inf"))
        p = s.softmax(-1)
        zg = (zl * gzl).sum(-1, keepdim=True)  # [b, h, t, 1]
        vg = torch.einsum("bhjd,bhtd->bhtj", v, gzl)  # v[t'] . dM/dz[t]
        # Key at t' replaced: the one changed logit of row t moves by s'[t, t'] - s[t, t'].
        out["k"][:, l] = one_logit_changed(scores(q, k2, scale, cap), p, s, zg, vg)
        # Value at t' replaced: z[t] moves by p[t, t'] (v'[t'] - v[t']).
        dvg = torch.einsum("bhjd,bhtd->bhtj", v2 - v, gzl)
        out["v"][:, l] = (p * dvg).masked_fill(~allowed, 0.0)
        s_q = scores(q2, k, scale, cap)
        if per_key:  # the query at t replaced in its score against t' only: one logit of row t
            out["q"][:, l] = one_logit_changed(s_q, p, s, zg, vg)
        else:  # the query at t replaced in the whole row t
            dz = (s_q.masked_fill(~allowed, float("-inf")).softmax(-1) - p) @ v
            out["q"][:, l] = (dz * gzl).sum(-1).masked_fill(~attention_mask.bool()[:, None, :], 0.0)
    return out


def span_one_hot(span_of: torch.Tensor, n_spans: int) -> torch.Tensor:
    """[batch, pos] span ids (-1 for padding) -> [batch, pos, n_spans] float one-hot."""
    out = torch.zeros(*span_of.shape, n_spans, dtype=torch.float64, device=span_of.device)
    real = span_of >= 0
    out[real, span_of[real]] = 1.0
    return out


def aggregate_crossing(scores: dict[str, torch.Tensor], span_of: torch.Tensor, n_spans: int) -> dict[str, torch.Tensor]:
    """Sum crossing scores over examples and over the tokens of each span pair:
    k, v, q: [layer, head, key span, query span] (whole-row q: [layer, head, query span])."""
    onehot = span_one_hot(span_of, n_spans)  # [b, t, s]
    out = {kind: torch.einsum("bjk,blhtj,btq->lhkq", onehot, scores[kind], onehot) for kind in pair_kinds(scores, 5)}
    if "q" not in out:
        out["q"] = torch.einsum("blht,btq->lhq", scores["q"], onehot)
    return out


def signed_absmax(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise, whichever of a and b has the larger magnitude (keeping its sign)."""
    return torch.where(b.abs() > a.abs(), b, a)


def within_max(graph: Graph, delta: torch.Tensor, grad: torch.Tensor, span_of: torch.Tensor, n_spans: int,
               chunk: int = 32) -> torch.Tensor:
    """Per span, the token-level within-position score of largest magnitude (signed), over the tokens
    of the batch: [n_spans, n_up, n_down]. delta [n_up, b, t, d], grad [n_down, b, t, d]."""
    out = torch.zeros(n_spans, delta.shape[0], grad.shape[0], dtype=torch.float64, device=HOST)
    flat = span_of.reshape(-1)
    d_tok, g_tok = delta.flatten(1, 2), grad.flatten(1, 2)  # [u, bt, d], [v, bt, d]
    for s in range(n_spans):
        tokens = (flat == s).nonzero(as_tuple=True)[0]
        if tokens.numel() == 0:  # a span empty in every example of the batch
            continue
        for part in tokens.split(chunk):
            prod = torch.bmm(d_tok[:, part].transpose(0, 1), g_tok[:, part].permute(1, 2, 0))  # [n, u, v]
            pick = prod.abs().argmax(0, keepdim=True)
            out[s] = signed_absmax(out[s], prod.gather(0, pick)[0].double().cpu())
    return out * graph.edge_mask.double()


def crossing_max(scores: dict[str, torch.Tensor], span_of: torch.Tensor, n_spans: int) -> dict[str, torch.Tensor]:
    """Per span pair, the token-level crossing score of largest magnitude (signed) in the batch."""
    L, H = scores["q"].shape[1:3]
    dev = scores["q"].device
    kinds = pair_kinds(scores, 5)
    out = {kind: torch.zeros(L, H, n_spans, n_spans, dtype=torch.float64, device=dev) for kind in kinds}
    if "q" not in kinds:
        out["q"] = torch.zeros(L, H, n_spans, dtype=torch.float64, device=dev)
    for s in range(n_spans):
        query = span_of == s  # [b, t]
        if not bool(query.any()):
            continue
        if "q" not in kinds:
            q = scores["q"].permute(1, 2, 0, 3)[:, :, query]  # [L, H, n]
            out["q"][:, :, s] = q.gather(-1, q.abs().argmax(-1, keepdim=True))[..., 0]
        for a in range(s + 1):
            key = span_of == a
            pair = query[:, :, None] & key[:, None, :]  # [b, t, t']
            if not bool(pair.any()):
                continue
            for kind in kinds:
                x = scores[kind].permute(1, 2, 0, 3, 4)[:, :, pair]  # [L, H, n]
                out[kind][:, :, a, s] = x.gather(-1, x.abs().argmax(-1, keepdim=True))[..., 0]
    return out


def batch_span_of(dataset, indices, width: int, device: torch.device | str = HOST) -> torch.Tensor:
    """[batch, width] span id of every token of the examples `indices` (-1 for padding), on `device`."""
    out = torch.full((len(indices), width), -1, dtype=torch.long, device=HOST)
    for row, i in enumerate(indices):
        ids = dataset.examples[i].span_of_positions()
        out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long, device=HOST)
    return out.to(device)


def concrete_counts(dataset, n_spans: int) -> dict[str, torch.Tensor]:
    """Token-level edges a span edge stands for, averaged over examples (docs/method.md §4):
    within: [span] = |S|; crossing: [key span, query span] = number of (t', t) with t' <= t;
    last: [span] = fraction of examples whose last token (where the logits read) lies in the span."""
    from ..circuits.span_circuit import span_counts

    counts = span_counts(dataset, list(range(n_spans)), n_spans)
    return {"within": counts["tokens"], "crossing": counts["pairs"], "last": counts["last"]}
