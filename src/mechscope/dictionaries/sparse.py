"""Sparse encode and decode for TopK training, with exact gradients (method.md §11).

A TopK dictionary keeps k of its d_sae latents per token, so of the dense encoder/decoder products
only n·k entries matter. The training loss (architectures.loss) still computes the pre-activations
densely once, without autograd, to choose the top k; everything that needs a gradient then goes
through the selected entries only:

- `select_pre_activations(centred, W_enc, b_enc, index, values)`: the pre-activations
  centred·W_enc[:, j] + b_enc[j] at the chosen latents j = index[n, k] ([n, k]). Its backward gives the
  exact gradients of W_enc, b_enc and the centred input from the n·k selected entries (a CSR
  product for W_enc, an embedding bag for the input, index_add for b_enc), never a dense [n, d_sae]
  product;
- `sparse_decode(index, values, W_dec)`: Σ_k values[n, k]·W_dec[index[n, k]] ([n, d_out], no bias),
  an embedding bag whose own backward gives the gradients of the values and of W_dec.

Both are exact: the same sums as the dense path, only in another order (so equal to rounding).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch.nn.functional import embedding_bag

_CSR_DTYPES = (torch.float32, torch.float64)  # what the sparse CSR product supports on every device


def scatter_rows(index: Tensor, weights: Tensor, rows: Tensor, size: int) -> Tensor:
    """[size, d]: out[j] = Σ_{n,k: index[n,k] = j} weights[n, k]·rows[n], for index, weights [n, k] and
    rows [n, d] — the product Sᵀ·rows with S the sparse [n, size] matrix of the weights."""
    n, k = index.shape
    flat = index.reshape(-1)
    source = torch.arange(n, device=index.device).repeat_interleave(k)
    if rows.dtype not in _CSR_DTYPES:  # no sparse product for this dtype: materialise n·k rows
        out = torch.zeros(size, rows.shape[1], dtype=rows.dtype, device=rows.device)
        return out.index_add_(0, flat, weights.reshape(-1, 1) * rows[source])
    order = torch.argsort(flat, stable=True)  # by latent, tokens ascending within each: valid CSR
    crow = torch.zeros(size + 1, dtype=torch.int64, device=index.device)
    crow[1:] = torch.bincount(flat, minlength=size).cumsum(0)
    with warnings.catch_warnings():  # torch marks CSR tensors "beta" on first use; we rely only on this product
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        matrix = torch.sparse_csr_tensor(crow, source[order], weights.reshape(-1)[order].to(rows.dtype),
                                         (size, n), device=rows.device, check_invariants=False)
    return matrix @ rows


class _SelectPreActivations(torch.autograd.Function):
    """centred·W_enc[:, index] + b_enc[index] per token; the forward takes the values already computed
    (the dense no-grad pre-activations gathered at index), the backward is sparse and exact."""

    @staticmethod
    def forward(ctx, centred, W_enc, b_enc, index, values):
        ctx.save_for_backward(centred, W_enc, index)
        ctx.b_shape = None if b_enc is None else b_enc.shape
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        centred, W_enc, index = ctx.saved_tensors
        d_centred = d_W = d_b = None
        if ctx.needs_input_grad[0]:
            # Σ_k grad[n, k]·W_enc[:, index[n, k]]: an embedding bag over the encoder's columns.
            d_centred = embedding_bag(index, W_enc.T.contiguous(), per_sample_weights=grad, mode="sum")
        if ctx.needs_input_grad[1]:
            d_W = scatter_rows(index, grad, centred, W_enc.shape[1]).T
        if ctx.needs_input_grad[2]:
            d_b = torch.zeros(ctx.b_shape, dtype=grad.dtype, device=grad.device)
            d_b.index_add_(0, index.reshape(-1), grad.reshape(-1))
        return d_centred, d_W, d_b, None, None


def select_pre_activations(centred: Tensor, W_enc: Tensor, b_enc: Tensor, index: Tensor,
                           values: Tensor | None = None) -> Tensor:
    """[n, k]: centred [n, d_in] · W_enc [d_in, d_sae] + b_enc [d_sae] at the latents index [n, k];
    `values` are those entries if already computed (they are not checked), else they are computed
    from the selected columns. Gradients reach centred, W_enc and b_enc (sparse backward)."""
    if values is None:
        with torch.no_grad():
            columns = W_enc.T.contiguous()[index]  # [n, k, d_in]
            values = torch.einsum("nkd,nd->nk", columns, centred) + b_enc[index]
    return _SelectPreActivations.apply(centred, W_enc, b_enc, index, values)


def sparse_decode(index: Tensor, values: Tensor, W_dec: Tensor) -> Tensor:
    """[n, d_out]: Σ_k values[n, k]·W_dec[index[n, k]] (no bias); gradients reach values and W_dec."""
    return embedding_bag(index, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")
