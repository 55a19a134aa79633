"""The logit lens: read the residual stream at each layer as if it were the last one, through the
model's final norm and unembedding.

The streams read are the embedding (`blocks.0.hook_resid_pre`: token embeddings, plus position
embeddings where the model has them) and the output of every layer (`blocks.{l}.hook_resid_post`).
The last of them is what the model itself decodes, so its logit lens is the model's own logits.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import MechscopeError


class LensError(MechscopeError, ValueError):
    """A lens that does not fit the model it is used with, or a lens file that cannot be read."""


def streams(model) -> list[tuple[str, str]]:
    """[(label, hook name)] of the residual streams a lens reads: "embed", then "0" ... "L-1" (the
    output of each layer)."""
    n = model.cfg.n_layers
    return [("embed", "blocks.0.hook_resid_pre")] + [(str(l), f"blocks.{l}.hook_resid_post") for l in range(n)]


@torch.no_grad()
def residuals(model, tokens: torch.Tensor) -> torch.Tensor:
    """[n_streams, batch, pos, d_model]: every stream of `streams(model)` on `tokens` (one forward
    pass that keeps only those activations)."""
    names = [name for _, name in streams(model)]
    wanted = set(names)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in wanted)
    return torch.stack([cache[n] for n in names])


def decode(model, h: torch.Tensor) -> torch.Tensor:
    """Logits [..., d_vocab] of residual vectors `h` [..., d_model]: final norm, then unembedding."""
    shape = h.shape[:-1]
    flat = h.reshape(1, -1, h.shape[-1])  # the bridge's components take [batch, pos, d_model]
    return model.unembed(model.ln_final(flat)).reshape(*shape, -1)


def kl_to_final(final_logprobs: torch.Tensor, lens_logits: torch.Tensor) -> torch.Tensor:
    """KL(final || lens) per row, in nats: rows of `final_logprobs` (log-probabilities) against the
    distributions of `lens_logits`."""
    lens_logprobs = torch.log_softmax(lens_logits.float(), dim=-1)
    final = final_logprobs.float()
    return (final.exp() * (final - lens_logprobs)).sum(-1)


@contextlib.contextmanager
def frozen(model):
    """The model's parameters take no gradient inside (a lens trains through the model's final norm
    and unembedding, but never changes them); the previous settings come back afterwards."""
    params = list(model.parameters())
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)
