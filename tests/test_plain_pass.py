"""The plain transformers pass (mechscope.plain_pass) reads the residual stream the bridge reads, on
each tiny architecture, and the activation buffer uses it only after checking that it does."""

from __future__ import annotations

import pytest
import torch
from devicecheck import DeviceAudit

from mechscope.dictionaries.activations import ActivationBuffer, read_activations, training_tokens
from mechscope.plain_pass import agrees, plain_model, read_residual, residual_points

DOCS = ["When Mary and John went to the store, John gave a drink to Mary.",
        "The war lasted from the year 1732 to the year 1737."] * 4
POINTS = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.0.hook_resid_post"]


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model(request, tiny_model_dirs, tiny_gemma):
    """The architectures whose bridge computes with the transformers modules' own weights."""
    import mechscope

    if request.param == "gemma3":
        return tiny_gemma
    return mechscope.load_model(str(tiny_model_dirs[request.param]), device="cpu")


def test_gpt2_keeps_the_bridge_pass(tiny_model_dirs):
    """GPT-2's bridge computes with split q/k/v copies of the fused c_attn weight, which the plain view
    does not hold: an edit to them would not reach it, so the plain pass is refused and the buffer reads
    through the bridge."""
    import mechscope

    model = mechscope.load_model(str(tiny_model_dirs["gpt2"]), device="cpu")
    tokens = training_tokens(model, DOCS, length=10)
    with pytest.raises(LookupError, match="parameters the plain view does not hold"):
        read_residual(model, tokens, POINTS)
    buffer = ActivationBuffer(model, "blocks.1.hook_resid_post", tokens, batch_size=8, buffer_size=40,
                              progress=False)
    assert len(list(buffer)) == len(buffer) and buffer.plain is False


def test_residual_points_are_recognised():
    assert residual_points(["blocks.3.hook_resid_pre", "blocks.12.hook_resid_post"]) == [(3, "pre"), (12, "post")]
    assert residual_points(["blocks.3.hook_resid_post", "blocks.3.hook_mlp_out"]) is None
    assert residual_points(["blocks.3.hook_resid_mid"]) is None


def test_plain_pass_equals_the_bridge(model):
    tokens = training_tokens(model, DOCS, length=10)
    ref = read_activations(model, tokens, POINTS)
    fast = read_residual(model, tokens, POINTS)
    for p in POINTS:
        assert fast[p].shape == ref[p].shape
        assert torch.allclose(fast[p], ref[p], atol=1e-5, rtol=1e-4), p
        assert not fast[p].is_inference()


def test_plain_pass_with_padding(model):
    tokens = training_tokens(model, DOCS, length=10)
    mask = torch.ones_like(tokens)
    mask[::2, 7:] = 0
    ref = read_activations(model, tokens, POINTS, mask)
    fast = read_residual(model, tokens, POINTS, mask)
    keep = mask.bool()
    for p in POINTS:
        assert torch.allclose(fast[p][keep], ref[p][keep], atol=1e-5, rtol=1e-4), p


def test_plain_pass_stops_after_the_last_layer_read(model):
    view = plain_model(model)
    ran = []
    handle = view.blocks[1].register_forward_hook(lambda *a: ran.append(1))
    try:
        tokens = training_tokens(model, DOCS[:2], length=10)
        read_residual(model, tokens, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"])
        assert ran == []
        read_residual(model, tokens, ["blocks.1.hook_resid_post"])
        assert ran == [1]
    finally:
        handle.remove()


def test_plain_view_shares_the_weights(model):
    view = plain_model(model)
    assert view is not None and len(view.blocks) == model.cfg.n_layers
    bridge_ptrs = {p.data_ptr() for p in model.parameters()}
    assert all(p.data_ptr() in bridge_ptrs for p in view.root.parameters())
    # changing a weight of the bridge changes the plain pass the same way (no stale copy)
    tokens = training_tokens(model, DOCS[:2], length=10)
    w = next(p for p in model.blocks[0].parameters() if p.dim() == 2)
    with torch.no_grad():
        w.mul_(1.5)
    try:
        ref = read_activations(model, tokens, POINTS[1:2])[POINTS[1]]
        fast = read_residual(model, tokens, POINTS[1:2])[POINTS[1]]
        assert torch.allclose(fast, ref, atol=1e-5, rtol=1e-4)
    finally:
        with torch.no_grad():
            w.div_(1.5)


def test_buffer_gives_the_same_batches_either_way(model):
    tokens = training_tokens(model, DOCS, length=10)
    runs = {}
    for plain in (True, False):
        buffer = ActivationBuffer(model, "blocks.1.hook_resid_post", tokens, batch_size=8, buffer_size=40,
                                  positions=True, progress=False, plain=plain)
        runs[plain] = list(buffer)
        assert buffer.plain is plain
    for (a, wa), (b, wb) in zip(runs[True], runs[False]):
        assert torch.equal(wa, wb)
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_buffer_falls_back_where_the_plain_pass_disagrees(model, monkeypatch):
    import mechscope.dictionaries.activations as acts

    tokens = training_tokens(model, DOCS, length=10)
    real = acts.read_residual
    monkeypatch.setattr(acts, "read_residual", lambda *a, **k: {p: v + 1.0 for p, v in real(*a, **k).items()})
    buffer = ActivationBuffer(model, "blocks.0.hook_resid_post", tokens, batch_size=8, buffer_size=40,
                              positions=True, progress=False)
    got = list(buffer)
    assert buffer.plain is False
    want = read_activations(model, tokens, ["blocks.0.hook_resid_post"])["blocks.0.hook_resid_post"]
    for batch, where in got:
        assert torch.allclose(batch, want[where[:, 0], where[:, 1]], atol=1e-5)


def test_attached_hooks_send_the_buffer_to_the_bridge(model):
    tokens = training_tokens(model, DOCS, length=10)
    point = "blocks.0.hook_resid_post"

    def shift(act, hook):
        return act + 2.0

    with model.hooks(fwd_hooks=[(point, shift)]):
        got = list(ActivationBuffer(model, point, tokens, batch_size=8, buffer_size=40, positions=True,
                                    progress=False))
    want = read_activations(model, tokens, [point])[point]
    for batch, where in got:
        assert torch.allclose(batch, want[where[:, 0], where[:, 1]] + 2.0, atol=1e-5)


def test_agrees_is_relative_per_row():
    ref = torch.tensor([[[1000.0, 1.0], [1.0, 2.0]]])
    assert agrees(ref, ref + torch.tensor([[[0.05, 0.0], [0.0, 0.0]]]))
    assert not agrees(ref, ref + torch.tensor([[[0.0, 0.0], [0.0, 0.01]]]))
    assert not agrees(ref, ref[:, :1])


def test_no_tensor_without_a_device(model):
    tokens = training_tokens(model, DOCS, length=10)
    with DeviceAudit() as audit:
        read_residual(model, tokens, POINTS)
        list(ActivationBuffer(model, "blocks.1.hook_resid_post", tokens, batch_size=8, buffer_size=40,
                              progress=False))
    assert not audit.leaks, audit.report()


@pytest.mark.gpu
def test_plain_pass_on_cuda(tiny_model_dirs):
    import mechscope

    model = mechscope.load_model(str(tiny_model_dirs["llama"]), device="cuda")
    tokens = training_tokens(model, DOCS, length=10).to("cuda")
    ref = read_activations(model, tokens, POINTS)
    fast = read_residual(model, tokens, POINTS)
    for p in POINTS:
        assert fast[p].device.type == "cuda"
        assert torch.allclose(fast[p], ref[p], atol=1e-4, rtol=1e-3), p


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_packaged_models_take_the_plain_pass(name, request):
    model = request.getfixturevalue(name)
    tokens = training_tokens(model, DOCS, length=24)
    points = ["blocks.5.hook_resid_post", "blocks.2.hook_resid_pre"]
    ref = read_activations(model, tokens, points)
    fast = read_residual(model, tokens, points)
    for p in points:
        assert agrees(ref[p], fast[p]), p
    buffer = ActivationBuffer(model, points[0], tokens, batch_size=32, progress=False)
    next(iter(buffer))
    assert buffer.plain is True
