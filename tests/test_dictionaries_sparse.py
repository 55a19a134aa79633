"""The sparse TopK training path (dictionaries/sparse.py) against the dense reference path."""

from __future__ import annotations

import pytest
import torch

from mechscope.dictionaries import Dictionary, architectures
from mechscope.dictionaries.architectures import loss, uses_sparse_path
from mechscope.dictionaries.sparse import scatter_rows, select_pre_activations, sparse_decode
from test_dictionaries import RESID1, TRAIN_SETTINGS, activations, make_config, stream  # noqa: F401

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def random_dictionary(architecture: str, dtype=torch.float64, d_in=12, d_sae=64, k=5, seed=0) -> Dictionary:
    """A topk dictionary with random biases (so some kept pre-activations are negative: ReLU matters)."""
    extra = {"activation": "topk"} if architecture != "topk" else {}
    config = make_config(architecture, d_in=d_in, d_sae=d_sae, k=k, aux_k=7,
                         dtype={torch.float64: "float64", torch.float32: "float32"}[dtype], **extra)
    sae = Dictionary(config).init_weights(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype)
            if name.startswith("b_") or name == "W_skip":
                p.copy_(0.3 * noise - (0.4 if name == "b_enc" else 0))
            else:
                p.add_(0.05 * noise)
    return sae


def inputs(sae: Dictionary, n=40, seed=3):
    gen = torch.Generator().manual_seed(seed)
    c = sae.config
    x = torch.randn(n, c.d_in, generator=gen, dtype=torch.float64).to(sae.dtype)
    y = torch.randn(n, c.out_width, generator=gen, dtype=torch.float64).to(sae.dtype) if c.is_transcoder else None
    return x, y


def loss_and_grads(sae, x, y, dead, sparse):
    sae.zero_grad(set_to_none=True)
    parts = loss(sae, x, y, dead, sparse=sparse)
    parts.loss.backward()
    return parts, {n: p.grad.clone() for n, p in sae.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("architecture", ["topk", "transcoder", "skip_transcoder"])
@pytest.mark.parametrize("with_dead", [False, True])
def test_sparse_loss_and_gradients_equal_the_dense_path(architecture, dtype, with_dead):
    sae = random_dictionary(architecture, dtype)
    assert uses_sparse_path(sae) and not uses_sparse_path(sae, sparse=False)
    x, y = inputs(sae)
    dead = None
    if with_dead:
        dead = torch.zeros(sae.config.d_sae, dtype=torch.bool)
        dead[::3] = True
    dense, dense_grads = loss_and_grads(sae, x, y, dead, sparse=False)
    sparse, sparse_grads = loss_and_grads(sae, x, y, dead, sparse=True)
    tol = TOL[dtype]
    assert sorted(sparse.parts) == sorted(dense.parts) == (["auxk", "mse"] if with_dead else ["mse"])
    torch.testing.assert_close(sparse.loss, dense.loss, **tol)
    for key in dense.parts:
        torch.testing.assert_close(sparse.parts[key], dense.parts[key], **tol)
    torch.testing.assert_close(sparse.output, dense.output, **tol)
    torch.testing.assert_close(sparse.latents, dense.latents, **tol)
    assert not sparse.latents.requires_grad and sparse.latents.shape == (x.shape[0], sae.config.d_sae)
    assert ((sparse.latents != 0).sum(-1) <= sae.config.k).all()
    assert ((dense.latents > 0) & (sparse.latents > 0)).sum() > 0
    for name, grad in dense_grads.items():
        assert grad.abs().max() > 0, name  # every parameter is reached (the comparison means something)
        torch.testing.assert_close(sparse_grads[name], grad, **tol, msg=lambda m: f"{name}: {m}")
    if with_dead:  # AuxK reaches dead latents that the top k never chose
        chosen = (dense.latents != 0).any(0)
        assert sparse_grads["W_enc"][:, dead & ~chosen].abs().sum() > 0


def test_the_switch_and_what_stays_dense(monkeypatch):
    for architecture, extra in [("batchtopk", {}), ("matryoshka", {"activation": "topk"}),
                                ("crosscoder", {"activation": "topk", "k": 4}), ("relu", {}),
                                ("transcoder", {"activation": "relu"})]:
        assert not uses_sparse_path(Dictionary(make_config(architecture, **extra))), architecture
    sae = Dictionary(make_config("topk"))
    monkeypatch.setattr(architectures, "SPARSE_TOPK", False)
    assert not uses_sparse_path(sae) and uses_sparse_path(sae, sparse=True)


def test_sparse_functions_are_exact():
    gen = torch.Generator().manual_seed(0)
    n, d, m, k = 9, 6, 20, 4
    centred = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    W = torch.randn(d, m, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(m, generator=gen, dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(m, d, generator=gen, dtype=torch.float64, requires_grad=True)
    index = torch.stack([torch.randperm(m, generator=gen)[:k] for _ in range(n)])
    with torch.no_grad():
        direct = (centred @ W + b).gather(1, index)
    torch.testing.assert_close(select_pre_activations(centred, W, b, index), direct)  # values computed
    torch.autograd.gradcheck(lambda c, w, bb: select_pre_activations(c, w, bb, index, None), (centred, W, b))
    vals = direct.clone().requires_grad_(True)
    dense = torch.zeros(n, m, dtype=torch.float64).scatter(1, index, vals.detach())
    torch.testing.assert_close(sparse_decode(index, vals, W_dec), dense @ W_dec)
    torch.autograd.gradcheck(lambda v, w: sparse_decode(index, v, w), (vals, W_dec))
    rows = torch.randn(n, 3, generator=gen)
    weights = torch.randn(n, k, generator=gen)
    expected = torch.zeros(n, m).scatter(1, index, weights).T @ rows
    torch.testing.assert_close(scatter_rows(index, weights, rows, m), expected)
    torch.testing.assert_close(scatter_rows(index, weights.bfloat16(), rows.bfloat16(), m).float(), expected,
                               rtol=0.05, atol=0.05)  # no CSR product in bfloat16: the index_add fallback


@pytest.mark.parametrize("architecture", ["topk", "skip_transcoder"])
def test_training_gives_the_same_parameters_either_way(architecture, activations, monkeypatch):  # noqa: F811
    from mechscope.dictionaries import train

    overrides, lr = TRAIN_SETTINGS[architecture]
    d = activations[RESID1].shape[1]
    trained = {}
    for dtype, tol in (("float64", dict(rtol=1e-9, atol=1e-11)), ("float32", dict(rtol=1e-4, atol=1e-5))):
        acts = {p: a.to(getattr(torch, dtype)) for p, a in activations.items()}
        for sparse in (False, True):
            monkeypatch.setattr(architectures, "SPARSE_TOPK", sparse)
            sae = Dictionary(make_config(architecture, d_in=d, d_sae=96, dtype=dtype, **overrides)).init_weights(0)
            batches, _ = stream(acts, architecture, batch=64)
            # dead_after of two batches: AuxK is on from the third step
            result = train(sae, batches, steps=8, lr=lr, progress=False, dead_after=128, log_every=1)
            assert any("auxk" in row for row in result.history)
            trained[sparse] = (sae.state_dict(), result)
        for name, value in trained[False][0].items():
            torch.testing.assert_close(trained[True][0][name], value, **tol, msg=lambda m: f"{name}: {m}")
        assert torch.equal(trained[True][1].tokens_since_fired, trained[False][1].tokens_since_fired)


def test_sparse_training_names_its_devices(activations):  # noqa: F811
    from devicecheck import DeviceAudit

    from mechscope.dictionaries import train

    d = activations[RESID1].shape[1]
    for architecture in ("topk", "skip_transcoder"):
        overrides, lr = TRAIN_SETTINGS[architecture]
        sae = Dictionary(make_config(architecture, d_in=d, d_sae=96, **overrides), device="cpu")
        assert uses_sparse_path(sae)
        batches, _ = stream(activations, architecture, batch=64)
        with DeviceAudit() as audit:
            sae.init_weights(0)
            result = train(sae, batches, steps=6, lr=lr, progress=False, dead_after=128, log_every=1)
        assert any("auxk" in row for row in result.history)
        assert not audit.leaks, audit.report()


@pytest.mark.gpu
def test_sparse_path_on_cuda():
    for architecture in ("topk", "skip_transcoder"):
        sae = random_dictionary(architecture, torch.float32).to("cuda")
        x, y = inputs(sae)
        x, y = x.cuda(), (None if y is None else y.cuda())
        dead = torch.zeros(sae.config.d_sae, dtype=torch.bool, device="cuda")
        dead[::3] = True
        dense, dense_grads = loss_and_grads(sae, x, y, dead, sparse=False)
        sparse, sparse_grads = loss_and_grads(sae, x, y, dead, sparse=True)
        assert sparse.output.device.type == "cuda" and sparse.latents.device.type == "cuda"
        torch.testing.assert_close(sparse.loss, dense.loss, **TOL[torch.float32])
        for name, grad in dense_grads.items():
            assert sparse_grads[name].device.type == "cuda"
            torch.testing.assert_close(sparse_grads[name], grad, **TOL[torch.float32], msg=lambda m: f"{name}: {m}")
