"""Norms after each sublayer (Gemma 2 and 3): the frozen-scale linearisation (docs/method.md §2).

In these models a layer adds to the residual stream not the sum of its heads' outputs but

    ln1_post(a) = w1 * a / r(a),   a = sum_h result_h,   r(a) = sqrt(mean_d(a^2) + eps)

(w1 the norm's effective weight, Gemma's 1 + weight; result_h = z_h @ W_O[h]), and likewise
ln2_post(m) = w2 * m / r(m) after the MLP. Because of the shared 1/r(a), one head's write depends on
every other head of its layer, so heads are not separate nodes of an additive graph. The graph splits
the attention write by holding r(a) fixed at its value on the run at hand: head h writes

    write_h = w1 * (z_h @ W_O[h]) / r(a)          (per position; r(a) is one number per token)

and the heads' writes sum exactly to ln1_post(a) on that run. The MLP is one node; its write is its
post-normed output ln2_post(m), as the model computes it.

What "frozen" means, precisely:
  * Node outputs. Every run splits with its own r: the clean run with the clean r, a counterfactual
    (or mean) reference run with its own r, an edge-ablated run with the r of that very run. So the
    full circuit is the model, and the empty circuit with counterfactual references is the
    counterfactual run, with no approximation.
  * Gradients. Wherever the graph takes dM/d(input of a node) (EAP and EAP-IG gradient passes, PEAP's
    dM/dz), both post-sublayer norms of every layer, ln1_post and ln2_post, act as the fixed diagonal
    maps x -> w * x / r with r their value on that gradient pass (the clean run for EAP, each
    interpolation point for EAP-IG): r is a constant, not differentiated. Pre-sublayer norms (ln1,
    ln2, the final norm) and the per-head q / k norms are differentiated as usual. EAP's scores are
    then exactly the first-order change of M, in the model whose post-norm scales are held at the
    clean run's values, when an edge's input moves towards its reference (what the jvp test checks).
    This is the usual linearisation: each sublayer's write is linear in its output, like the residual
    stream itself, so a head's effect reaches the metric only through the edges of the graph and not
    through the norm statistics of its siblings.
"""

from __future__ import annotations

from typing import Callable

import torch


def has_post_norms(model) -> bool:
    """Whether `model` normalises each sublayer's output before adding it (Gemma 2 / 3)."""
    return "blocks.0.ln1_post.hook_scale" in model.hook_dict


def post_norm_weight(model, layer: int, which: str = "ln1_post") -> torch.Tensor:
    """Effective weight of a post-sublayer norm [d_model] (1 + weight where the model stores an offset)."""
    norm = getattr(model.blocks[layer], which)
    weight = norm.weight.detach()
    return 1.0 + weight if getattr(norm, "uses_weight_offset", False) else weight


def head_write_weights(model) -> torch.Tensor:
    """[layer, head, d_head, d_model]: the map from a head's z to its write, up to the frozen 1/r.

    W_O for models without post-sublayer norms; W_O[l] * w1[l] (each output column scaled by ln1_post's
    weight) for models with them, so that write_h = (z_h / r) @ W[l, h]."""
    W_O = model.W_O.detach()
    if not has_post_norms(model):
        return W_O
    w = torch.stack([post_norm_weight(model, l) for l in range(W_O.shape[0])]).to(W_O.device, W_O.dtype)
    return W_O * w[:, None, None, :]


def frozen_scale_hooks(model, n_layers: int) -> list[tuple[str, Callable]]:
    """Forward hooks that hold every post-sublayer norm's 1/r constant for autograd (none without
    post norms). The forward values are untouched, bit for bit: the norm's output becomes
    out.detach() + (x - x.detach()) * (w / r).detach(), whose value is `out` and whose derivative with
    respect to the norm's input x is the frozen diagonal w / r."""
    if not has_post_norms(model):
        return []
    hooks: list[tuple[str, Callable]] = []
    for l in range(n_layers):
        for which, out_name in (("ln1_post", f"blocks.{l}.hook_attn_out"), ("ln2_post", f"blocks.{l}.hook_mlp_out")):
            state: dict[str, torch.Tensor] = {}
            weight = post_norm_weight(model, l, which)

            def keep_input(value, hook=None, state=state):
                state["x"] = value
                return value

            def keep_scale(value, hook=None, state=state):
                state["r"] = value
                return value

            def freeze(value, hook=None, state=state, weight=weight):
                x, r = state.pop("x"), state.pop("r")
                if not x.requires_grad:
                    return value
                factor = (weight.to(x.dtype) / r.detach()).to(x.dtype)
                return value.detach() + (x - x.detach()) * factor

            hooks += [(f"blocks.{l}.{which}.hook_in", keep_input), (f"blocks.{l}.{which}.hook_scale", keep_scale),
                      (out_name, freeze)]
    return hooks
