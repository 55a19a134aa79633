"""One attention head computed by hand, as the model computes it: the hooks that hold its (rotated)
queries and keys and its values, the model's score scale and soft-capping, causal and padding masks.

PEAP needs this twice: to score crossing edges (a key, value or query of one position replaced inside
the head) and to evaluate span circuits whose crossing edges are ablated (each (query, key) pair of a
head may mix this run's and the reference run's queries, keys and values).
"""

from __future__ import annotations

import math

import torch


def qkv_hook_names(model, layer: int) -> tuple[str, str, str]:
    """Names of the hooks holding a layer's queries and keys (rotated, for rotary models) and values."""
    rot_q = f"blocks.{layer}.attn.hook_rot_q"
    if rot_q in model.hook_dict:
        q, k = rot_q, f"blocks.{layer}.attn.hook_rot_k"
    else:
        q, k = f"blocks.{layer}.attn.hook_q", f"blocks.{layer}.attn.hook_k"
    return q, k, f"blocks.{layer}.attn.hook_v"


def _hf_config(model):
    original = getattr(model, "original_model", None)
    return getattr(original, "config", None)


def attention_scale(model) -> float:
    """The factor attention scores are multiplied by: 1 / sqrt(d_head) unless the model says else
    (TransformerLens' `attn_scale`, or Gemma's `query_pre_attn_scalar`, whose inverse square root
    Gemma uses in place of d_head's)."""
    cfg = model.cfg
    scale = getattr(cfg, "attn_scale", None)
    if scale is None or scale <= 0:
        scalar = getattr(_hf_config(model), "query_pre_attn_scalar", None)
        scale = math.sqrt(scalar if scalar else cfg.d_head)
    return 1.0 / float(scale)


def sliding_window(model) -> int | None:
    """The window of the model's local-attention layers (a query sees the keys fewer than `window`
    positions back), or None when no layer has one."""
    cfg, hf = model.cfg, _hf_config(model)
    window = getattr(hf, "sliding_window", None) if hf is not None else None
    types = getattr(hf, "layer_types", None) if hf is not None else None
    if window and (types is None or "sliding_attention" in types):
        return int(window)
    if getattr(cfg, "use_local_attn", False) or getattr(cfg, "window_size", None):
        return int(getattr(cfg, "window_size", None) or 0)
    return None


def score_soft_cap(model) -> float | None:
    """The model's attention-score soft-capping (Gemma 2), or None."""
    cap = getattr(model.cfg, "attn_scores_soft_cap", None)
    return float(cap) if cap is not None and cap > 0 else None


def check_supported(model, n_positions: int | None = None) -> None:
    """Refuse attention variants the hand computation does not reproduce.

    Local (sliding-window) layers, as in Gemma 2 / 3, are computed as full causal attention, which is
    exact while no prompt reaches past the window: with `n_positions` (the padded prompt length) no
    larger than the window every key is within reach of every later query. Longer prompts are
    refused; without `n_positions` only the architecture is checked."""
    cfg = model.cfg
    if getattr(cfg, "positional_embedding_type", "") == "alibi":
        raise NotImplementedError("crossing edges are not implemented for ALiBi attention")
    window = sliding_window(model)
    if window is not None and n_positions is not None and n_positions > window:
        raise NotImplementedError(
            f"crossing edges with local attention are computed only for prompts within the window: "
            f"a batch has {n_positions} positions, the model's sliding window is {window}"
        )


def per_query_head(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[b, t, heads or kv heads, d] -> [b, heads, t, d], repeating each key-value head over its group."""
    return x.repeat_interleave(n_heads // x.shape[2], dim=2).transpose(1, 2)


def scores(q: torch.Tensor, k: torch.Tensor, scale: float, soft_cap: float | None) -> torch.Tensor:
    """Attention logits [b, h, t, t'] from q [b, h, t, d] and k [b, h, t', d] (no mask)."""
    s = torch.einsum("bhtd,bhjd->bhtj", q, k) * scale
    if soft_cap is not None:
        s = soft_cap * torch.tanh(s / soft_cap)
    return s


def is_causal(model) -> bool:
    """Whether the model's attention is causal (decoder LMs) or bidirectional (compiled tracr models)."""
    return getattr(model.cfg, "attention_dir", "causal") != "bidirectional"


def allowed_mask(attention_mask: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """[b, 1, t, t'] True where query t may attend to key t' (causal unless told, key not padding)."""
    t = attention_mask.shape[1]
    order = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device)
    if causal:
        order = order.tril()
    return order[None, None] & attention_mask.bool()[:, None, None, :]


def mixed_head_outputs(live, reference, keep_q, keep_k, keep_v, allowed, scale, soft_cap) -> torch.Tensor:
    """z [b, t, h, d_head] of every head with crossing edges ablated.

    live / reference: (q [b, t, h, d], k [b, t, kv, d], v [b, t, kv, d]); keep_q / keep_k / keep_v
    [b, h, t, t'] pick, for query t and key t', the query, key and value from the live run (1) or the
    reference (0), each independently: the score of (t, t') is that of the picked query and key.
    """
    n_heads = live[0].shape[2]
    q, q_ref = live[0].transpose(1, 2), reference[0].transpose(1, 2)
    k, k_ref = per_query_head(live[1], n_heads), per_query_head(reference[1], n_heads)
    v, v_ref = per_query_head(live[2], n_heads), per_query_head(reference[2], n_heads)
    keep_k = keep_k.bool()
    s = torch.where(keep_k, scores(q, k, scale, soft_cap), scores(q, k_ref, scale, soft_cap))
    s_ref = torch.where(keep_k, scores(q_ref, k, scale, soft_cap), scores(q_ref, k_ref, scale, soft_cap))
    s = torch.where(keep_q.bool(), s, s_ref)
    p = s.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    keep_v = keep_v.to(p.dtype)
    z = (p * keep_v) @ v + (p * (1 - keep_v)) @ v_ref
    return z.transpose(1, 2)
