"""The training loss of each architecture (method.md §11).

Every loss starts from the reconstruction error ‖y − ŷ‖² (summed over the features, averaged over the
tokens; y = x for autoencoders, the target activation for transcoders) and adds what the
architecture's sparsity calls for:

- relu (and relu-activated transcoders / crosscoders): λ·Σ_i f_i‖W_dec,i‖ (decoder norms in the penalty);
- topk, batchtopk (and matryoshka): AuxK, α·‖e − ê‖², where e = y − ŷ is the residual (held fixed) and
  ê its reconstruction by the `aux_k` largest pre-activations among the dead latents only (no bias);
- jumprelu: λ·Σ_i H(z_i − θ_i), the L0 norm, whose θ-gradient comes from the rectangle-kernel STE;
- gated: λ·Σ_i ReLU(π_gate,i)‖W_dec,i‖ (unit decoder rows) plus the auxiliary
  ‖x − (W_dec·ReLU(π_gate) + b_dec)‖² through a frozen copy of the decoder, which trains the gate
  path to reconstruct on its own;
- matryoshka: the reconstruction error of each nested prefix of the latents, averaged over the prefixes.

Plain TopK dictionaries and TopK transcoders / skip transcoders (not crosscoders, not matryoshka)
take a sparse path (module sparse.py): the pre-activations are computed densely without autograd,
once, to choose the top k (and AuxK's dead latents); the gradients then flow through the n·k selected
entries only (sparse encode and decode with exact gradients). It computes the same loss and gradients
as the dense path, to rounding; `SPARSE_TOPK = False` (or `loss(..., sparse=False)`) takes the dense
path, the reference the tests compare it with.

A BatchTopK dictionary in training also updates its inference threshold here: a running average
(momentum `threshold_momentum`) of the smallest activation kept in each batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .dictionary import Dictionary, step, topk_mask
from .sparse import select_pre_activations, sparse_decode

SPARSE_TOPK = True  # TopK losses through the sparse path (False: the dense reference path)


@dataclass
class LossParts:
    """The loss of one batch and what it is made of (detached tensors, for logging), with the latents and output."""

    loss: Tensor
    latents: Tensor
    output: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)


def squared_error(output: Tensor, target: Tensor, crosscoder: bool) -> Tensor:
    """‖target − output‖² per token (summed over the features; a crosscoder's over its hook points too)."""
    diff = (output - target).pow(2)
    return diff.sum((-2, -1)) if crosscoder else diff.sum(-1)


def decode_without_bias(sae: Dictionary, f: Tensor, rows: slice = slice(None)) -> Tensor:
    """W_dec[rows]·f (no b_dec) for latents `f` of the rows' width."""
    if sae.config.architecture == "crosscoder":
        return torch.einsum("...s,shd->...hd", f, sae.W_dec[rows])
    return f @ sae.W_dec[rows]


def uses_sparse_path(sae: Dictionary, sparse: bool | None = None) -> bool:
    """Whether `loss` takes the sparse TopK path for `sae` (`sparse` None: the module's SPARSE_TOPK)."""
    c = sae.config
    wanted = SPARSE_TOPK if sparse is None else sparse
    return bool(wanted) and c.sparsity == "topk" and c.architecture not in ("crosscoder", "matryoshka")


def loss(sae: Dictionary, x: Tensor, target: Tensor | None = None, dead: Tensor | None = None,
         sparse: bool | None = None) -> LossParts:
    """The training loss of `sae` on inputs `x` [n, d_in] (crosscoders [n, n_hooks, d_in]) against
    `target` (default x; a transcoder's [n, d_out]); `dead` [d_sae] marks the latents AuxK may use.
    `sparse` chooses the TopK path (None: SPARSE_TOPK; see the module's docstring)."""
    c = sae.config
    cross = c.architecture == "crosscoder"
    target = x if target is None else target
    if uses_sparse_path(sae, sparse):
        return sparse_topk_loss(sae, x, target, dead)
    pre = sae.pre_activations(x)
    f = sae.activate(pre, x)
    output = sae.decode(f)
    skip = sae.skip(x)
    if skip is not None:
        output = output + skip
    error = squared_error(output, target, cross)
    parts: dict[str, Tensor] = {}
    if c.architecture == "matryoshka":
        recon = 0
        for size in c.prefixes:
            partial = decode_without_bias(sae, f[..., :size], slice(0, size)) + sae.b_dec
            recon = recon + squared_error(partial, target, cross).mean()
        recon = recon / len(c.prefixes)
    else:
        recon = error.mean()
    total = recon
    parts["mse"] = error.mean().detach()
    kind = c.sparsity
    if kind == "relu":
        penalty = c.l1_coefficient * (f * sae.decoder_norms()).sum(-1).mean()
        total = total + penalty
        parts["l1"] = penalty.detach()
    elif kind == "gated":
        gate = pre.relu()
        norms = sae.decoder_norms()
        penalty = c.l1_coefficient * (gate * norms).sum(-1).mean()
        frozen = gate @ sae.W_dec.detach() + sae.b_dec.detach()
        aux = squared_error(frozen, target, cross).mean()
        total = total + penalty + aux
        parts["l1"], parts["aux"] = penalty.detach(), aux.detach()
    elif kind == "jumprelu":
        l0 = step(pre, sae.threshold, c.jumprelu_bandwidth).sum(-1).mean()
        total = total + c.l0_coefficient * l0
        parts["l0_penalty"] = (c.l0_coefficient * l0).detach()
    elif kind in ("topk", "batchtopk"):
        if kind == "batchtopk" and sae.training:
            update_threshold(sae, f)
        if dead is not None and c.aux_coefficient > 0 and bool(dead.any()):
            aux = auxk(sae, pre, dead, (target - output).detach())
            total = total + c.aux_coefficient * aux
            parts["auxk"] = aux.detach()
    return LossParts(total, f, output, parts)


def sparse_topk_loss(sae: Dictionary, x: Tensor, target: Tensor, dead: Tensor | None) -> LossParts:
    """The TopK loss (reconstruction + AuxK) through the selected latents only; `latents` are the
    dense latents, detached (for dead-latent tracking and L0)."""
    c = sae.config
    with torch.no_grad():
        pre = sae.pre_activations(x)  # the same product as the dense path: the same top k
        top, index = pre.topk(c.k, dim=-1)
    centred = x if c.is_transcoder else x - sae.b_dec
    values = select_pre_activations(centred, sae.W_enc, sae.b_enc, index, top).relu()
    output = sparse_decode(index, values, sae.W_dec) + sae.b_dec
    skip = sae.skip(x)
    if skip is not None:
        output = output + skip
    error = squared_error(output, target, False)
    total = error.mean()
    parts = {"mse": error.mean().detach()}
    if dead is not None and c.aux_coefficient > 0 and bool(dead.any()):
        k_aux = aux_count(sae, dead)
        with torch.no_grad():
            top_aux, index_aux = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1)
        aux_values = select_pre_activations(centred, sae.W_enc, sae.b_enc, index_aux, top_aux).relu()
        estimate = sparse_decode(index_aux, aux_values, sae.W_dec)
        aux = squared_error(estimate, (target - output).detach(), False).mean()
        total = total + c.aux_coefficient * aux
        parts["auxk"] = aux.detach()
    latents = torch.zeros_like(pre).scatter_(-1, index, values.detach())
    return LossParts(total, latents, output, parts)


def aux_count(sae: Dictionary, dead: Tensor) -> int:
    """How many dead latents AuxK uses: aux_k (default d_in // 2), at most the number dead."""
    c = sae.config
    return min(c.aux_k or max(c.d_in // 2, 1), int(dead.sum()))


def auxk(sae: Dictionary, pre: Tensor, dead: Tensor, residual: Tensor) -> Tensor:
    """‖e − ê‖² per token, averaged: ê reconstructs the residual e from the aux_k largest pre-activations
    of the dead latents (AuxK, Gao et al. 2024)."""
    c = sae.config
    k_aux = aux_count(sae, dead)
    masked = pre.masked_fill(~dead, float("-inf"))
    f_aux = topk_mask(masked, k_aux)
    f_aux = torch.nan_to_num(f_aux, neginf=0.0)
    estimate = decode_without_bias(sae, f_aux)
    return squared_error(estimate, residual, c.architecture == "crosscoder").mean()


@torch.no_grad()
def update_threshold(sae: Dictionary, f: Tensor) -> None:
    """Move a BatchTopK dictionary's inference threshold towards the smallest activation kept in
    this batch (the first estimate is taken as it is)."""
    kept = f[f > 0]
    if kept.numel() == 0:
        return
    smallest = kept.min()
    m = sae.config.threshold_momentum
    if float(sae.threshold) <= 0:
        sae.threshold.copy_(smallest)
    else:
        sae.threshold.mul_(m).add_((1 - m) * smallest)
