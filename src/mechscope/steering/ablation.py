"""Directional ablation (Arditi et al. 2024): project a unit direction r out of every write to the
residual stream, x <- x - (x.r) r.

The residual stream is the sum of its writes: the token embedding (and the learned position
embedding where the model has one), then each layer's attention output and MLP output. Removing the
component along r from each write removes it from the stream at every layer and position, so no
later component can read r. The writes are the TransformerLens hook points `hook_embed`
(+ `hook_pos_embed` for learned positions), `blocks.{l}.hook_attn_out` and `blocks.{l}.hook_mlp_out`.
The projection is done in float32 and cast back to the model's dtype.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from .vectors import SteeringError, SteeringVector, check_vector


def residual_writes(model) -> list[str]:
    """The hook points of every write to the residual stream, in order."""
    points = ["hook_embed"]
    if getattr(model.cfg, "positional_embedding_type", "standard") == "standard" and "hook_pos_embed" in model.hook_dict \
            and _learned_positions(model):
        points.append("hook_pos_embed")
    for l in range(model.cfg.n_layers):
        points += [f"blocks.{l}.hook_attn_out", f"blocks.{l}.hook_mlp_out"]
    return points


def _learned_positions(model) -> bool:
    """Whether the model adds a learned position embedding to the stream (GPT-2), rather than rotating
    queries and keys (Llama, Gemma), whose bridge may still carry a `hook_pos_embed` alias."""
    return any(name.startswith("pos_embed.") for name in model.hook_dict) and not any(
        name.startswith("rotary_emb.") for name in model.hook_dict)


def unit_direction(model, direction) -> torch.Tensor:
    """`direction` (a tensor [d_model] or a SteeringVector) as a float32 unit vector on the host."""
    if isinstance(direction, SteeringVector):
        vec = direction.vector
    else:
        vec = direction
    vec = check_vector(model, "hook_embed", vec, "direction to ablate")
    if vec.dim() != 1:
        raise SteeringError(f"the direction to ablate must be one vector [d_model], got shape {tuple(vec.shape)}")
    norm = vec.norm()
    if not norm > 0:
        raise SteeringError("the direction to ablate is zero")
    return vec / norm


def ablation_hooks(model, direction) -> list:
    """[(hook point, fn)] projecting the unit direction out of every residual write."""
    r = unit_direction(model, direction)
    cached: dict = {}

    def project(act, hook):
        if act.shape[-1] != r.shape[0]:
            return act
        if act.device not in cached:
            cached[act.device] = r.to(act.device)
        u = cached[act.device]
        x = act.float()
        return (x - (x @ u).unsqueeze(-1) * u).to(act.dtype)

    return [(p, project) for p in residual_writes(model)]


@contextmanager
def ablated(model, direction) -> Iterator[None]:
    """Every forward pass inside the block has `direction` projected out of every residual write;
    activations collected inside it (e.g. `probes.activations.collect`) are those of the ablated model."""
    with model.hooks(fwd_hooks=ablation_hooks(model, direction)):
        yield
