"""Training to a chosen L0 (dictionaries/target_l0.py): the coefficient controller, JumpReLU's data-driven
thresholds, BatchTopK's final inference threshold, resuming, and bad input."""

from __future__ import annotations

import pytest
import torch
from test_dictionaries import Interrupt, activations, make_config, sample_input, stream  # noqa: F401

from mechscope.dictionaries import Dictionary, DictionaryError, evaluate, train
from mechscope.dictionaries.target_l0 import L0Controller, final_batch_threshold, init_density

TARGET = 12.0


@pytest.mark.parametrize("architecture,coefficient", [("relu", 0.1), ("gated", 0.1), ("jumprelu", 0.01)])
def test_training_to_a_target_l0_lands_near_it(architecture, coefficient, activations):
    d = activations["blocks.1.hook_resid_post"].shape[1]
    field = "l0_coefficient" if architecture == "jumprelu" else "l1_coefficient"
    held_l0 = {}
    for target in (None, TARGET):
        sae = Dictionary(make_config(architecture, d_in=d, d_sae=128, **{field: coefficient})).init_weights(0)
        batches, held = stream(activations, architecture)
        result = train(sae, batches, steps=200, lr=3e-3, progress=False, target_l0=target)
        held_l0[target] = evaluate(sae, [held]).l0()
        if target is not None:
            assert evaluate(sae, [held]).fvu() < 0.6
            moved = getattr(sae.config, field)
            if architecture == "jumprelu":  # steered through its thresholds: the coefficient stays as given
                assert moved == coefficient and field not in result.history[-1]
            else:
                assert moved != coefficient and result.history[-1][field] == pytest.approx(moved)
    # the fixed coefficient lands elsewhere; the controlled run within 25% of the target
    assert abs(held_l0[TARGET] - TARGET) <= 0.25 * TARGET, held_l0
    assert abs(held_l0[None] - TARGET) > 0.25 * TARGET, held_l0


def test_jumprelu_thresholds_from_the_first_batch():
    config = make_config("jumprelu", d_sae=64)
    sae = Dictionary(config).init_weights(0)
    x = sample_input(config, n=400, seed=3) * 50  # activations far larger than threshold_init
    assert float((sae.encode(x) > 0).float().sum(-1).mean()) > 20  # the default thresholds: dense
    init_density(sae, x, target_l0=8)
    pre = sae.pre_activations(x)
    m = round(400 * 8 / 64)
    for i in range(0, 64, 7):  # each threshold is its latent's m-th largest pre-activation on the batch
        assert float(sae.threshold[i].detach()) == pytest.approx(max(float(pre[:, i].detach().topk(m).values[-1]), 1e-3))
    l0 = float((sae.encode(x) > 0).float().sum(-1).mean())
    assert 6 <= l0 <= 8  # strictly above the m-th largest: m - 1 of the 400 tokens per latent (or fewer)
    assert sae.config.jumprelu_bandwidth == pytest.approx(0.1 * float(sae.threshold.detach().median()))
    with pytest.raises(DictionaryError, match="for relu, gated and jumprelu dictionaries, not topk"):
        init_density(Dictionary(make_config("topk")).init_weights(0), x, 8)


@pytest.mark.parametrize("architecture", ["relu", "gated"])
def test_relu_and_gated_biases_from_the_first_batch(architecture):
    config = make_config(architecture, d_sae=64)
    sae = Dictionary(config).init_weights(0)
    x = sample_input(config, n=400, seed=3) * 50
    before = sae.pre_activations(x).detach()
    init_density(sae, x, target_l0=8)
    after = sae.pre_activations(x).detach()
    m = round(400 * 8 / 64)
    torch.testing.assert_close(after, before - before.topk(m, dim=0).values[-1])  # each latent's m-th largest -> 0
    assert ((after > 0).sum(0) <= m - 1).all() and ((after > 0).sum(0) >= m - 2).all()
    assert 6 <= float((sae.encode(x) > 0).float().sum(-1).mean()) <= 8

def test_the_controller_moves_the_coefficient_towards_the_target():
    sae = Dictionary(make_config("relu", l1_coefficient=1.0)).init_weights(0)
    control = L0Controller(sae, target=4, rate=0.5)
    steps = [(16, 2.0), (4, 2.0), (1, 1.0), (1e6, 2.0)]  # 4x too dense: x 4^0.5; on target; 4x too sparse: / 2;
    for l0, coefficient in steps:                        # at most a factor of 2 per step
        control.update(l0)
        assert control.coefficient == pytest.approx(coefficient)
    assert sae.config.l1_coefficient == pytest.approx(2.0)
    with pytest.raises(DictionaryError, match="rate must be positive"):
        L0Controller(sae, 4, rate=0)
    # a jumprelu's thresholds take the factor, all alike; its coefficient stays
    jump = Dictionary(make_config("jumprelu", l0_coefficient=0.01)).init_weights(0)
    with torch.no_grad():
        jump.threshold.copy_(torch.linspace(0.5, 2.0, jump.config.d_sae))
    before = jump.threshold.detach().clone()
    control = L0Controller(jump, target=4, rate=0.5)
    assert control.update(16) == pytest.approx(2.0)  # too dense: every threshold doubled
    torch.testing.assert_close(jump.threshold.detach(), 2 * before)
    assert control.update(1) == pytest.approx(0.5)
    torch.testing.assert_close(jump.threshold.detach(), before)
    assert jump.config.l0_coefficient == 0.01


def test_batchtopk_ends_with_the_mean_threshold_of_the_last_steps(activations):
    d = activations["blocks.1.hook_resid_post"].shape[1]
    sae = Dictionary(make_config("batchtopk", d_in=d, d_sae=128, k=8)).init_weights(0)
    batches, held = stream(activations, "batchtopk")
    train(sae, batches, steps=60, lr=3e-3, progress=False)
    assert float(sae.threshold) > 0
    assert abs(evaluate(sae, [held]).l0() - 8) <= 0.25 * 8
    assert final_batch_threshold([0.0, 2.0, 4.0, float("nan")]) == 3.0
    assert final_batch_threshold([]) is None


def test_resuming_a_target_l0_run_gives_the_uninterrupted_result(tmp_path):
    config = make_config("jumprelu", l0_coefficient=0.05)  # bandwidth and thresholds set from the first batch
    kw = dict(steps=10, lr=1e-2, checkpoint_every=3, progress=False, target_l0=6)
    full = Dictionary(config).init_weights(0)
    train(full, Interrupt(config), **kw)
    sae = Dictionary(make_config("jumprelu", l0_coefficient=0.05)).init_weights(0)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        train(sae, Interrupt(config, at=7), checkpoint=ckpt, **kw)
    again = Dictionary(make_config("jumprelu", l0_coefficient=0.05)).init_weights(0)
    train(again, Interrupt(config), checkpoint=ckpt, resume=True, **kw)
    assert again.config == full.config and full.config.jumprelu_bandwidth != config.jumprelu_bandwidth
    for name, value in full.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], value, rtol=0, atol=0, msg=name)
    with pytest.raises(DictionaryError, match="trained with target_l0=6.0, not 5.0"):
        train(Dictionary(config).init_weights(0), Interrupt(config), checkpoint=ckpt, resume=True,
              **{**kw, "target_l0": 5})


def test_resuming_batchtopk_keeps_the_window_of_batch_minima(tmp_path):
    config = make_config("batchtopk")
    kw = dict(steps=30, lr=1e-2, checkpoint_every=4, progress=False, dead_after=64)
    full = Dictionary(config).init_weights(0)
    train(full, Interrupt(config), **kw)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):  # the checkpoint at step 28 is inside the 3-step window
        train(Dictionary(config).init_weights(0), Interrupt(config, at=29), checkpoint=ckpt, **kw)
    again = Dictionary(config).init_weights(0)
    train(again, Interrupt(config), checkpoint=ckpt, resume=True, **kw)
    assert float(again.threshold) == float(full.threshold) > 0


def test_target_l0_bad_input():
    with pytest.raises(DictionaryError, match="fires k=4 latents per token by construction"):
        train(Dictionary(make_config("topk")).init_weights(0), iter([]), steps=3, target_l0=4, progress=False)
    for bad in (0, -1, 32, True, "8"):
        with pytest.raises(DictionaryError, match="target_l0 must be a number between 0 and d_sae=32"):
            train(Dictionary(make_config("relu")).init_weights(0), iter([]), steps=3, target_l0=bad,
                  progress=False)
