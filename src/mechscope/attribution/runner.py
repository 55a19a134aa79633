"""Run a TransformerBridge as a computational graph (docs/method.md §2).

One forward pass with hooks that can
  * record every upstream node's output: `up[u, b, t, :]`, shape [n_upstream, batch, pos, d_model]
    (node-major, so that contractions over examples, positions and d_model are plain matrix
    products on contiguous slices);
  * record every downstream node's input, to take gradients of the metric with respect to them;
  * ablate edges: the input of downstream node v becomes
        in_v + sum_u (1 - keep[u, v]) * (ref_u - z_u)
    where z_u is u's output in this very run and ref_u its reference value (counterfactual, mean or
    zero). With `keep` all ones nothing changes; with `keep` all zeros and counterfactual references
    every downstream input equals its value on the counterfactual prompt, because the residual stream
    is the plain sum of upstream outputs (and constant biases).
  * replace the input embedding (EAP-IG interpolates it between counterfactual and clean).

`keep` is [n_up, n_down] (the same at every position), [batch, pos, n_up, n_down], or, for a span
circuit (PEAP), [n_spans, n_up, n_down] with `span_of` [batch, pos] naming each token's span. Span
circuits may also ablate crossing edges inside attention (`AttentionAblation`): each head's output is
then recomputed from its queries, keys and values with, per (query position t, key position t'), the
key and value at t' and the query at t taken from this run or from the reference run.

Hook points used (TransformerLens names): `blocks.0.hook_resid_pre` (input node), `blocks.{l}.attn.
hook_z` (heads: their writes z_h @ W_O[h] are computed from it), `blocks.{l}.hook_mlp_out` (MLPs),
`blocks.{l}.hook_{q,k,v}_input` (per-head and per-key-value-head inputs, when inputs are split),
`blocks.{l}.attn.hook_{q,k,v}` and `blocks.{l}.hook_resid_pre` (gradients without split inputs),
`blocks.{l}.hook_mlp_in`, and `ln_final.hook_in` (the logits' input).

Models with a norm after each sublayer (Gemma 2 / 3) are run under the frozen-scale linearisation of
post_norm.py: a head's write is w1 * (z_h @ W_O[h]) / r with r `blocks.{l}.ln1_post.hook_scale` of the
same run (so the writes of a layer's heads sum to `hook_attn_out` exactly), the MLP's write is
`hook_mlp_out` (already post-normed), and passes that take gradients hold every post-norm scale fixed.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from ..graph import Graph
from .attention import allowed_mask, check_supported, is_causal, mixed_head_outputs, qkv_hook_names
from .post_norm import frozen_scale_hooks, has_post_norms, head_write_weights


def tokens_by_span(span_of: torch.Tensor, n_spans: int) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """Tokens of a batch grouped by span: (order, ranges). `order` holds the flat (row-major) indices
    of the tokens of span_of [batch, pos] sorted by span, in position order within a span, padding (-1)
    left out; `ranges` holds (span, start, end) of each non-empty span's slice of `order`. Gathering a
    [.., batch * pos, ..] tensor with `order` makes every span's tokens one contiguous block."""
    flat = span_of.reshape(-1)
    counts = torch.bincount(flat[flat >= 0], minlength=n_spans).tolist()
    order = torch.argsort(flat, stable=True)[flat.numel() - sum(counts):]  # padding sorts first
    ranges, start = [], 0
    for s, c in enumerate(counts):
        if c:
            ranges.append((s, start, start + c))
        start += c
    return order, ranges


def prepare_model(model, split_inputs: bool = True) -> None:
    """Switch on the hooks the graph needs. `split_inputs` gives every head its own copy of the
    residual stream (needed to patch one head's input); gradients alone do without it."""
    if not getattr(model, "_mechscope_graph_hooks", False):
        model.set_use_hook_mlp_in(True)
        model._mechscope_graph_hooks = True
    if getattr(model, "_mechscope_split_inputs", None) != split_inputs:
        model.set_use_split_qkv_input(split_inputs)
        model._mechscope_split_inputs = split_inputs


# A correction that reads more than this fraction of the nodes before it is one dense product (see _plan).
DENSE_FROM = 0.3


def check_ablatable(model) -> None:
    """GraphError unless the model gives each head its own copy of the residual stream, which edge
    ablation needs (evaluation, exact patching, ACDC): bridges whose attention has no fork point refuse
    it. Leaves the split switched on (`prepare_model` switches it as each pass needs)."""
    from ..graph import GraphError

    try:
        model.set_use_split_qkv_input(True)
    except (NotImplementedError, AttributeError) as e:
        raise GraphError(f"edges of this model cannot be ablated: its attention cannot take a separate input per "
                         f"head ({e})") from None
    model._mechscope_split_inputs = True


class StopForward(Exception):
    """Raised at the final residual when a pass only needs the upstream outputs (no logits)."""


@dataclass
class AttentionAblation:
    """Crossing edges to ablate inside attention, for the layers present in the dictionaries.

    keep_k / keep_v / keep_q: layer -> [batch, head, t, t'] (1 keeps the edge key/value@t' -> head@t,
    or the query@t in its score against key t'); reference: layer -> (q, k, v) as the hooks give them
    ([batch, pos, head or kv head, d_head]; q and k rotated for rotary models).
    """

    keep_k: dict[int, torch.Tensor]
    keep_v: dict[int, torch.Tensor]
    keep_q: dict[int, torch.Tensor]
    reference: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    scale: float
    soft_cap: float | None = None


@dataclass
class Ablation:
    keep: torch.Tensor  # [n_up, n_down], [batch, pos, n_up, n_down] or [n_spans, n_up, n_down]; 1 keeps
    reference: torch.Tensor  # [n_up, batch, pos, d_model] reference outputs of the upstream nodes
    span_of: torch.Tensor | None = None  # [batch, pos] span of each token (-1: padding), with span keep
    attention: AttentionAblation | None = None
    # Compute each correction from the nodes with non-zero weight only, choosing per group of readers
    # between the drop weights and their complement (GraphRun._plan). Same values to float rounding;
    # off by default so that forward-mode derivatives through `keep` (whose zero pattern the plan
    # reads) stay exact.
    sparse: bool = False
    # A dict shared by the span-circuit ablations of one batch (same reference and spans): the reference
    # sorted by span is computed once and reused (see GraphRun._init_span_layout).
    layout: dict | None = None


class GraphRun:
    """State of one hooked forward pass; use through `graph_forward`."""

    def __init__(
        self,
        graph: Graph,
        record_up: bool,
        record_down: bool,
        ablation: Ablation | None,
        input_override: Callable[[torch.Tensor], torch.Tensor] | None,
        split_inputs: bool = True,
        W_O: torch.Tensor | None = None,
        stop_at_final: bool = False,
        heads_as_z: bool = False,
        attention_names: list[tuple[str, str, str]] | None = None,
        capture_attention: bool = False,
        post_norms: bool = False,
    ):
        if ablation is not None and not split_inputs:
            raise ValueError("edge ablation needs split per-head inputs")
        self.graph = graph
        self.split_inputs = split_inputs
        # [layer, head, d_head, d_model]: W_O, or W_O times ln1_post's weight with post-sublayer norms.
        self.W_O = W_O
        # With post-sublayer norms (Gemma 2 / 3; see post_norm.py) a head's write is (z / r) @ W_O,
        # r the ln1_post scale of this run: z waits in `pending_z` until the norm's scale hook gives r,
        # and `inv_scale[layer]` ([b, t, 1, 1], 1 / r) stays for callers that take writes from `z`.
        self.post_norms = post_norms
        self.pending_z: dict[int, torch.Tensor] = {}
        self.inv_scale: dict[int, torch.Tensor] = {}
        self.stop_at_final = stop_at_final
        # With heads_as_z the head rows of `up` stay unwritten and each layer's z is kept instead:
        # a caller that needs only differences of head writes takes them as (z' - z) @ W_O, once.
        self.heads_as_z = heads_as_z
        self.z: dict[int, torch.Tensor] = {}
        self.final_residual: torch.Tensor | None = None  # [b, t, d], the logits node's input
        # Without split inputs, q/k/v gradients are taken at the projections and mapped back to the
        # (shared) pre-norm input of each head; these hold the projections and the norm inputs.
        self.projected: dict[int, tuple[int, str, torch.Tensor]] = {}
        self.norm_inputs: dict[int, torch.Tensor] = {}
        self.record_up = record_up or ablation is not None  # upstream outputs are needed
        self.store_up = record_up  # ... and kept in `up` (ablation alone only needs their deltas)
        self.record_down = record_down
        self.ablation = ablation
        self.input_override = input_override
        self.up: torch.Tensor | None = None  # [n_up, batch, pos, d_model], detached values
        self.down: dict[int, torch.Tensor] = {}  # first downstream index -> live input tensor
        # Per layer (q, k, v) hook names; with `capture_attention` (or crossing-edge ablation) the
        # run keeps each layer's q, k, v in `attention[layer]` (detached).
        self.attention_names = attention_names
        self.capture_attention = capture_attention
        self.attention: dict[int, list[torch.Tensor | None]] = {}
        if ablation is not None:
            keep = ablation.keep.to(ablation.reference.dtype)
            self.drop = 1.0 - keep  # weight of each edge's correction
            self.by_span = ablation.span_of is not None
            if self.drop.dim() == 2:
                self.drop_t = self.drop.T.contiguous()  # [n_down, n_up]
                # Downstream nodes with at least one ablated edge: the others need no correction (a
                # circuit that ablates only a few edges, as ACDC's tests do, skips most products). A
                # keep that carries a derivative (a forward-mode tangent, or one that requires grad)
                # may move any edge: then every node is corrected.
                tangent = torch.autograd.forward_ad.unpack_dual(self.drop).tangent
                if tangent is not None or self.drop.requires_grad:
                    self.ablated_down = [True] * graph.n_downstream
                else:
                    self.ablated_down = self.drop.ne(0).any(0).tolist()
            if self.by_span:
                self._init_span_layout(ablation)
            else:
                self.delta = torch.empty_like(ablation.reference)
            self._fix_key = None
            # Sum of delta over the upstream nodes [0, summed) written so far, for the complement form
            # of a correction (see `_plan`); None once nodes write out of order (then it is summed
            # at the read) or with per-position keep, which does not use it.
            self.summed: int | None = 0 if ablation.sparse and (self.by_span or self.drop.dim() == 2) else None
            self.running: torch.Tensor | None = None
            self._plans: dict | None = None

    def _init_span_layout(self, ablation: Ablation) -> None:
        """Keep delta with the (batch, pos) axis flattened and sorted by span ([n_up, tokens, d]), so
        every span's tokens are one contiguous slice and its correction is one matrix product."""
        ref = ablation.reference
        self.drop_t = self.drop.transpose(1, 2).contiguous()  # [span, n_down, n_up]
        layout = ablation.layout if ablation.layout is not None else {}
        key = (self.drop.shape[0], ablation.span_of.data_ptr(), ref.data_ptr())
        if layout.get("key") != key:
            order, ranges = tokens_by_span(ablation.span_of.to(ref.device), self.drop.shape[0])
            layout.update(key=key, order=order, ranges=ranges, ref_sorted=ref.flatten(1, 2)[:, order])
        self.order, self.span_ranges = layout["order"], layout["ranges"]
        self.ref_sorted = layout["ref_sorted"]  # [n_up, tokens, d]
        self.delta = torch.empty_like(self.ref_sorted)
        self.bt = ref.shape[1:3]

    def _set_delta(self, index, value: torch.Tensor, sorted_tokens: bool = False) -> None:
        """delta[index] = reference - value, for node-major values [n, batch, pos, d] or [batch, pos, d]
        (span circuits: or, with `sorted_tokens`, [n, tokens, d] already in the span-sorted layout)."""
        if sorted_tokens:
            self.delta[index] = self.ref_sorted[index] - value
        elif self.by_span:
            flat = value.flatten(-3, -2) if value.dim() == 3 else value.flatten(1, 2)
            self.delta[index] = self.ref_sorted[index] - flat[..., self.order, :]
        else:
            self.delta[index] = self.ablation.reference[index] - value
        if self.summed is not None:
            start, stop = (index, index + 1) if isinstance(index, int) else (index.start, index.stop)
            if start != self.summed:
                self.summed = None
                return
            part = self.delta[start:stop].sum(0)
            self.running = part if self.running is None else self.running + part
            self.summed = stop

    def _sum_before(self, n_before: int) -> torch.Tensor:
        """Sum of delta over the upstream nodes [0, n_before)."""
        if self.summed == n_before and self.running is not None:
            return self.running
        return self.delta[:n_before].sum(0)

    def _plan(self) -> dict:
        """How each correction is computed, from the drop weights, once per pass (on the host: one
        transfer instead of a synchronisation per read).

        A correction sum_u drop[v, u] delta_u costs one read of delta_u per upstream node u with a
        non-zero weight. Small circuits keep few edges, so most weights are 1; then the complement
        sum_u delta_u - sum_u keep[v, u] delta_u, with the first sum kept running as nodes write,
        reads only the kept nodes. Each group of readers (and, for span circuits, each span) takes the
        form with fewer nodes to read: (complement?, node indices, weights [readers, nodes])."""
        drop = self.drop_t.detach().to("cpu", torch.float64)  # [n_down, n_up] or [span, n_down, n_up]
        dev, dtype = self.drop_t.device, self.drop_t.dtype
        plans = {}
        steps = self.graph.downstream_read_step
        for read_step in sorted(set(steps.tolist())):
            lo, hi = self._read_group(read_step)
            n_before = self.graph.n_upstream_before(read_step)
            blocks = drop[..., lo:hi, :n_before]
            per = []
            for block in (blocks if self.by_span else [blocks]):
                keep = 1.0 - block
                d_cols = block.ne(0).any(0).nonzero().flatten()
                k_cols = keep.ne(0).any(0).nonzero().flatten()
                complement = len(k_cols) + 1 < len(d_cols)
                cols, weights = (k_cols, keep) if complement else (d_cols, block)
                if len(cols) > DENSE_FROM * n_before:
                    # Most nodes are read anyway: one product over the contiguous prefix of delta
                    # reads it once, where gathering the rows first would copy them.
                    per.append((False, None, block.to(dev, dtype)))
                else:
                    per.append((complement, cols.to(dev), weights[:, cols].to(dev, dtype)))
            plans[read_step] = per
        return plans

    def _group_plans(self, read_step: int, lo: int, hi: int, n_before: int) -> list:
        """The plans of one group of readers (one per span for span circuits): `_plan`'s with
        `Ablation.sparse`, else the drop weights as they are, one dense product each (they may carry a
        derivative, which a plan read from their zero pattern would lose)."""
        if not self.ablation.sparse:
            blocks = self.drop_t[..., lo:hi, :n_before]
            return [(False, None, block) for block in (blocks if self.by_span else [blocks])]
        if self._plans is None:
            self._plans = self._plan()
        return self._plans[read_step]

    def _apply(self, plan, n_before: int, delta: torch.Tensor, lo: int, hi: int, tokens=None) -> torch.Tensor:
        """One group's correction [readers, tokens * d] from delta [u, tokens, d] (a span's tokens with
        `tokens` = (start, end) in the sorted layout)."""
        complement, cols, weights = plan
        if tokens is not None:
            delta = delta[:, tokens[0]:tokens[1]]
        flat = delta.reshape(delta.shape[0], -1)
        if cols is None:
            return weights @ flat
        fix = weights @ flat.index_select(0, cols) if len(cols) else None
        if complement:
            total = self._sum_before(n_before)
            total = (total if tokens is None else total[tokens[0]:tokens[1]]).reshape(1, -1)
            return total.expand(hi - lo, -1) if fix is None else total - fix
        return fix if fix is not None else torch.zeros(hi - lo, flat.shape[1], dtype=flat.dtype, device=flat.device)

    # --------------------------------------------------------------------------------------------

    def _store_up(self, index: int | slice, value: torch.Tensor) -> None:
        if not self.record_up:
            return
        value = value.detach()
        value = value.permute(2, 0, 1, 3) if value.dim() == 4 else value
        if self.store_up:
            if self.up is None:
                b, t, d = value.shape[-3:]
                # Every upstream node writes its slot during the pass, so no zero-fill is needed.
                self.up = torch.empty(self.graph.n_upstream, b, t, d, dtype=value.dtype, device=value.device)
            self.up[index] = value
        if self.ablation is not None:
            self._set_delta(index, value)

    def _correct(self, first: int, count: int, read_step: int, value: torch.Tensor) -> torch.Tensor:
        """Apply edge ablation to the inputs of downstream nodes first..first+count-1."""
        if self.ablation is None:
            return value
        n_before = self.graph.n_upstream_before(read_step)
        delta = self.delta[:n_before]  # [u, b, t, d]: reference - this run's output, filled as nodes write
        if self.by_span:
            key = (read_step, n_before)
            if self._fix_key != key:
                lo, hi = self._read_group(read_step)
                fix_sorted = torch.empty(hi - lo, *delta.shape[1:], dtype=delta.dtype, device=delta.device)
                plans = self._group_plans(read_step, lo, hi, n_before)
                for s, a, b in self.span_ranges:  # a span's tokens are contiguous in delta
                    fix_sorted[:, a:b] = self._apply(plans[s], n_before, delta, lo, hi, (a, b)).view(hi - lo, b - a, -1)
                fix = torch.zeros(hi - lo, self.bt[0] * self.bt[1], delta.shape[-1], dtype=delta.dtype,
                                  device=delta.device)
                fix[:, self.order] = fix_sorted
                self._fix_key, self._fix, self._fix_lo = key, fix.view(hi - lo, *self.bt, -1), lo
            fix = self._fix[first - self._fix_lo : first - self._fix_lo + count].permute(1, 2, 0, 3)
        elif self.drop.dim() == 2:
            if not any(self.ablated_down[first : first + count]):
                return value
            # One matrix product per group of nodes reading at this step (q, k and v of a layer share
            # it), so delta is read once per group rather than once per hook.
            key = (read_step, n_before)
            if self._fix_key != key:
                lo, hi = self._read_group(read_step)
                plan = self._group_plans(read_step, lo, hi, n_before)[0]
                fix = self._apply(plan, n_before, delta, lo, hi).view(hi - lo, *delta.shape[1:])
                self._fix_key, self._fix, self._fix_lo = key, fix, lo
            fix = self._fix[first - self._fix_lo : first - self._fix_lo + count].permute(1, 2, 0, 3)
        else:
            drop = self.drop[..., :n_before, first : first + count]
            fix = torch.einsum("ubtd,btuv->btvd", delta, drop)
        if value.dim() == 3:  # MLP input or final residual: one downstream node
            return value + fix[:, :, 0]
        return value + fix

    def _read_group(self, read_step: int) -> tuple[int, int]:
        steps = self.graph.downstream_read_step
        idx = (steps == read_step).nonzero().flatten()
        return int(idx[0]), int(idx[-1]) + 1

    def _downstream(self, first: int, count: int, read_step: int):
        def hook(value, hook=None):
            value = self._correct(first, count, read_step, value)
            if self.record_down:
                if value.dim() == 3:
                    # The MLP-input hook hands over the residual tensor itself, which the skip
                    # connection also uses; a copy makes its gradient the MLP branch's alone.
                    value = value.clone()
                self.down[first] = value
            return value

        return hook

    def hooks(self) -> list[tuple[str, Callable]]:
        g = self.graph
        hooks: list[tuple[str, Callable]] = []

        def input_hook(value, hook=None):
            self._fix_key = None  # a new pass: corrections cached from an earlier one are stale
            if self.input_override is not None:
                value = self.input_override(value)
            if self.record_down and torch.is_grad_enabled() and not value.requires_grad:
                # Make every downstream input part of the autograd graph even when the weights do
                # not require gradients (or the input was replaced).
                value = value.detach().requires_grad_(True)
            self._store_up(0, value)
            return value

        hooks.append(("blocks.0.hook_resid_pre", input_hook))
        for l in range(g.n_layers):
            attn_read = 2 * l
            mlp_read = 2 * l if g.parallel_attn_mlp else 2 * l + 1
            if self.split_inputs:
                hooks.append((f"blocks.{l}.hook_q_input", self._downstream(g.q_slice(l).start, g.n_heads, attn_read)))
                hooks.append((f"blocks.{l}.hook_k_input", self._downstream(g.k_slice(l).start, g.n_kv_heads, attn_read)))
                hooks.append((f"blocks.{l}.hook_v_input", self._downstream(g.v_slice(l).start, g.n_kv_heads, attn_read)))
            elif self.record_down:
                hooks.append((f"blocks.{l}.hook_resid_pre", self._norm_input_hook(l)))
                for kind, sl in (("q", g.q_slice(l)), ("k", g.k_slice(l)), ("v", g.v_slice(l))):
                    hooks.append((f"blocks.{l}.attn.hook_{kind}", self._projection_hook(l, kind, sl.start)))
            if self._attention_layer(l):
                for i, name in enumerate(self.attention_names[l]):
                    hooks.append((name, self._attention_capture_hook(l, i)))
            if self.record_up or self._attention_layer(l):
                hooks.append((f"blocks.{l}.attn.hook_z", self._head_results_hook(l)))
                if self.post_norms:
                    hooks.append((f"blocks.{l}.ln1_post.hook_scale", self._post_scale_hook(l)))
            hooks.append((f"blocks.{l}.hook_mlp_in", self._downstream(g.mlp_in_index(l), 1, mlp_read)))
            hooks.append((f"blocks.{l}.hook_mlp_out", self._upstream_hook(g.mlp_index(l))))
        logits_input = self._downstream(g.logits_index, 1, 2 * g.n_layers)

        def final(value, hook=None):
            value = logits_input(value)
            self.final_residual = value
            if self.stop_at_final:
                raise StopForward
            return value

        hooks.append(("ln_final.hook_in", final))
        return hooks

    def _norm_input_hook(self, layer: int):
        def hook(value, hook=None):
            self.norm_inputs[layer] = value.detach()
            return value

        return hook

    def _projection_hook(self, layer: int, kind: str, first: int):
        def hook(value, hook=None):
            self.projected[first] = (layer, kind, value)
            return value

        return hook

    def _attention_layer(self, layer: int) -> bool:
        """Whether this pass needs `layer`'s q, k, v (captured, or for crossing-edge ablation)."""
        if self.capture_attention:
            return True
        att = self.ablation.attention if self.ablation is not None else None
        return att is not None and layer in att.keep_k

    def _attention_capture_hook(self, layer: int, slot: int):
        def hook(value, hook=None):
            self.attention.setdefault(layer, [None, None, None])[slot] = value.detach()
            return value

        return hook

    def _head_results_hook(self, layer: int):
        """Each head's write to the residual stream, z_h @ W_O[h] (TransformerLens' hook_result
        without its bias), computed here outside autograd instead of by the model's per-head path.
        With crossing-edge ablation in this layer the head outputs are first recomputed. With
        post-sublayer norms the write is (z_h / r) @ W_O[h] * w1, written once ln1_post's scale r of
        this run is known (`_post_scale_hook`)."""

        def hook(z, hook=None):
            att = self.ablation.attention if self.ablation is not None else None
            if att is not None and layer in att.keep_k:
                z = mixed_head_outputs(
                    self.attention[layer], att.reference[layer], att.keep_q[layer], att.keep_k[layer],
                    att.keep_v[layer], self.allowed, att.scale, att.soft_cap,
                ).to(z.dtype)
            if self.heads_as_z:
                self.z[layer] = z.detach()
                return z
            if not self.record_up:
                return z
            if self.post_norms:
                self.pending_z[layer] = z.detach()
                return z
            self._write_heads(layer, z.detach())
            return z

        return hook

    def _write_heads(self, layer: int, z: torch.Tensor) -> None:
        w = self.W_O[layer].to(z.dtype)
        heads = self.graph.upstream_slice(layer)
        if self.store_up:
            self.up[heads] = torch.einsum("bthe,hed->hbtd", z, w)
            if self.ablation is not None:
                self._set_delta(heads, self.up[heads])
        elif self.by_span:  # the writes go straight into the span-sorted layout of delta
            zs = z.flatten(0, 1)[self.order]  # [tokens, head, d_head]
            self._set_delta(heads, torch.einsum("nhe,hed->hnd", zs, w), sorted_tokens=True)
        else:
            self._set_delta(heads, torch.einsum("bthe,hed->hbtd", z, w))

    def _post_scale_hook(self, layer: int):
        """ln1_post's scale r [b, t, 1] on this run: the heads' writes of `layer` are z / r times W."""

        def hook(scale, hook=None):
            inv = 1.0 / scale.detach()[..., None]  # [b, t, 1, 1]
            self.inv_scale[layer] = inv
            z = self.pending_z.pop(layer, None)
            if z is not None:
                self._write_heads(layer, z * inv.to(z.dtype))
            return scale

        return hook

    def _upstream_hook(self, index):
        def hook(value, hook=None):
            self._store_up(index, value)
            return value

        return hook

    def downstream_inputs(self) -> list[tuple[int, torch.Tensor]]:
        """(first downstream index, live input tensor) in graph order."""
        return sorted(self.down.items())


@contextmanager
def graph_hooks(
    model,
    graph: Graph,
    record_up: bool = False,
    record_down: bool = False,
    ablation: Ablation | None = None,
    input_override: Callable[[torch.Tensor], torch.Tensor] | None = None,
    split_inputs: bool = True,
    stop_at_final: bool = False,
    heads_as_z: bool = False,
    capture_attention: bool = False,
    attention_mask: torch.Tensor | None = None,
):
    """Context manager: inside it, `model(...)` runs with the graph hooks; yields the `GraphRun`.

    With `stop_at_final` the pass ends with `StopForward` at the final residual, skipping the
    unembedding, for passes that only record upstream outputs. With `capture_attention` every layer's
    q, k, v are kept in `run.attention`. Crossing-edge ablation needs the batch's `attention_mask`."""
    prepare_model(model, split_inputs)
    # The bridge assembles W_O for all layers on each access, so read it once per pass.
    W_O = head_write_weights(model) if ((record_up and not heads_as_z) or ablation is not None) else None
    crossing = ablation is not None and ablation.attention is not None
    names = [qkv_hook_names(model, l) for l in range(graph.n_layers)] if capture_attention or crossing else None
    run = GraphRun(
        graph, record_up, record_down, ablation, input_override, split_inputs, W_O, stop_at_final, heads_as_z,
        names, capture_attention, has_post_norms(model),
    )
    if crossing:
        if attention_mask is None:
            raise ValueError("crossing-edge ablation needs the batch's attention_mask")
        check_supported(model, attention_mask.shape[1])
        run.allowed = allowed_mask(attention_mask, is_causal(model))
    # Gradient passes hold the post-sublayer norms' scales fixed (post_norm.py): no hooks otherwise.
    frozen = frozen_scale_hooks(model, graph.n_layers) if record_down else []
    with model.hooks(fwd_hooks=frozen + run.hooks()):
        yield run


def downstream_grads(run: GraphRun, metric_sum: torch.Tensor, model=None) -> torch.Tensor:
    """Gradients of `metric_sum` w.r.t. every downstream input: [n_down, batch, pos, d_model].

    Without split inputs (`model` is then needed for its weights), the gradient at a head's query
    input is the gradient at its query projection mapped back through W_Q and the pre-attention norm
    (chain rule; the norm's Jacobian is applied analytically), and likewise for keys and values.
    """
    items = run.downstream_inputs()
    projected = sorted(run.projected.items())
    tensors = [t for _, t in items] + [t for _, (_, _, t) in projected]
    grads = torch.autograd.grad(metric_sum, tensors, allow_unused=True)
    ref = items[0][1]
    b, t, d = ref.shape[0], ref.shape[1], ref.shape[-1]
    out = torch.empty(run.graph.n_downstream, b, t, d, dtype=ref.dtype, device=ref.device)
    filled = torch.zeros(run.graph.n_downstream, dtype=torch.bool, device=ref.device)
    for (first, tensor), grad in zip(items, grads[: len(items)]):
        width = 1 if tensor.dim() == 3 else tensor.shape[2]
        if grad is None:
            continue
        out[first : first + width] = grad.permute(2, 0, 1, 3) if grad.dim() == 4 else grad[None]
        filled[first : first + width] = True
    # The bridge assembles W_Q etc. for all layers on each access, so read each once.
    weights = {"q": model.W_Q, "k": model.W_K, "v": model.W_V} if projected else {}  # [layer, head, d, d_head]
    # A layer's q, k and v inputs are consecutive downstream nodes reading the same normed residual:
    # one product and one norm backward per layer serve all three (fewer, larger kernels).
    by_layer: dict[int, list] = {}
    for (first, (layer, kind, _)), grad in zip(projected, grads[len(items):]):
        if grad is not None:
            by_layer.setdefault(layer, []).append((first, grad, weights[kind][layer]))
    for layer, parts in by_layer.items():
        parts.sort(key=lambda part: part[0])
        first, width = parts[0][0], sum(g.shape[2] for _, g, _ in parts)
        if first + width != parts[-1][0] + parts[-1][1].shape[2]:  # not one run of nodes: one at a time
            chunks = [(f, [(g, w)]) for f, g, w in parts]
        else:
            chunks = [(first, [(g, w) for _, g, w in parts])]
        for start, pieces in chunks:
            grad = torch.cat([g for g, _ in pieces], dim=2)  # [b, t, nodes, d_head]
            weight = torch.cat([w for _, w in pieces]).to(grad.dtype)  # [nodes, d, d_head]
            normed = torch.einsum("bthe,hde->hbtd", grad, weight)  # node-major, like `out`
            out[start : start + grad.shape[2]] = norm_backward(model, run.norm_inputs[layer], normed)
            filled[start : start + grad.shape[2]] = True
    if not filled.all():
        out[~filled] = 0.0
    return out


def run_to_final_logits(model, run: GraphRun, tokens: torch.Tensor, attention_mask, last: torch.Tensor):
    """Run `model` (inside `graph_hooks(..., stop_at_final=True)`) and return the logits at each
    example's last token [b, vocab].

    The pass stops at the final residual; the final norm and unembedding are applied here to the last
    positions only, which spares the unembedding of every other position (forward and backward).
    """
    try:
        model(tokens, attention_mask=attention_mask)
    except StopForward:
        pass
    return last_token_logits(model, run, last)


def last_token_logits(model, run: GraphRun, last: torch.Tensor) -> torch.Tensor:
    """Logits [b, vocab] at each example's last token, from the final residual a pass recorded."""
    last = last.to(run.final_residual.device)  # under a device_map the last layer may sit elsewhere
    resid = run.final_residual[torch.arange(len(last), device=last.device), last]  # [b, d]
    return unembed(model, resid)


def unembed(model, resid: torch.Tensor) -> torch.Tensor:
    """Logits from final-residual vectors [..., d]: the final norm (scale folded into W_U), W_U, b_U
    and the model's logit soft-capping, if any."""
    kind = (model.cfg.normalization_type or "").upper()
    if kind.startswith("LN"):
        resid = resid - resid.mean(-1, keepdim=True)
    elif kind and not kind.startswith("RMS"):
        raise NotImplementedError(f"normalization '{model.cfg.normalization_type}' is not supported here")
    # No normalisation (compiled tracr models): the logits are the residual stream times W_U.
    normed = resid * (resid.pow(2).mean(-1, keepdim=True) + float(model.cfg.eps)).rsqrt() if kind else resid
    logits = normed @ model.W_U.to(normed.dtype)
    b_U = getattr(model, "b_U", None)
    if b_U is not None:
        logits = logits + b_U.to(logits.dtype)
    cap = getattr(model.cfg, "output_logits_soft_cap", None)
    if cap is not None and cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits


def norm_backward(model, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """Vector-Jacobian product of the pre-attention norm at x [b, t, d] for grad_out [n, b, t, d].

    In compatibility mode the norm's scale is folded into the next weights, so the norm is plain
    LayerNorm (centre, then divide by the standard deviation) or RMSNorm (divide by the root mean
    square), each with the model's eps.
    """
    kind = (model.cfg.normalization_type or "").upper()
    if not kind:  # no normalisation: the identity
        return grad_out
    eps = float(model.cfg.eps)
    x = x[None].to(grad_out.dtype)
    if kind.startswith("LN"):
        x = x - x.mean(-1, keepdim=True)
        grad_out = grad_out - grad_out.mean(-1, keepdim=True)
    elif not kind.startswith("RMS"):
        raise NotImplementedError(f"normalization '{model.cfg.normalization_type}' has no analytic backward here")
    # With y = x / r and r = sqrt(mean(x^2) + eps): dx = (g - y * mean(g * y)) / r
    #                                                  = g / r - x * mean(g * x) / r^3.
    inv_r = (x.pow(2).mean(-1, keepdim=True) + eps).rsqrt()  # [1, b, t, 1]
    coef = (grad_out * x).mean(-1, keepdim=True) * inv_r.pow(3)  # [n, b, t, 1]
    return torch.addcmul(grad_out * inv_r, x, coef, value=-1.0)
