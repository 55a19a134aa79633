"""Modular addition (Nanda et al. 2023): the fast last-position forward equals the hooked model's, a
short training memorises its training pairs, the Fourier basis and the frequency ablations behave
exactly as their definitions say, checkpoints round-trip, bad configs are refused, and the CLI trains
and analyses a small model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from devicecheck import DeviceAudit
from mechscope.cli import app
from mechscope.toys import ToyError, get_toy
from mechscope.toys.modular_addition import (ModularAdditionConfig, ablate_frequencies, ablated_accuracy, analyze,
                                             embedding_spectrum, fourier_basis, key_frequencies, last_logits, load,
                                             make_split, train)
from mechscope.toys.transformer import HookedToyTransformer

SMALL = dict(p=23, d_model=32, n_heads=2, d_head=16, d_mlp=64, frac_train=0.5, lr=1e-2, eval_every=25,
             stop_after_grok=-1)


@pytest.fixture(scope="module")
def trained():
    return train(ModularAdditionConfig(**SMALL, steps=300), progress=False, device="cpu")


def test_registry_finds_the_toy():
    toy = get_toy("modular-addition")
    assert toy.config is ModularAdditionConfig and toy.train is train
    cfg = ModularAdditionConfig()
    assert (cfg.p, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.weight_decay, cfg.betas) == \
        (113, 128, 4, 32, 512, 1.0, (0.9, 0.98))
    mc = cfg.model_config()
    assert (mc.n_layers, mc.n_ctx, mc.d_vocab, mc.d_vocab_out, mc.act_fn, mc.normalization_type) == \
        (1, 3, 114, 113, "relu", None)


def test_split_covers_every_pair_once():
    cfg = ModularAdditionConfig(p=11, frac_train=0.3)
    split = make_split(cfg)
    both = torch.cat([split.train, split.test])
    assert sorted(both.tolist()) == list(range(121)) and len(split.train) == round(0.3 * 121)
    a, b, eq = split.tokens.T
    assert torch.equal(split.labels, (a + b) % 11) and bool((eq == 11).all())
    assert torch.equal(make_split(cfg).train, split.train)
    assert not torch.equal(make_split(ModularAdditionConfig(p=11, frac_train=0.3, seed=1)).train, split.train)


def test_last_logits_equal_the_hooked_forward():
    cfg = ModularAdditionConfig(**SMALL)
    model = HookedToyTransformer(cfg.model_config()).init_weights(seed=1)
    with torch.no_grad():  # non-zero biases too, so every term is exercised
        for param in model.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    tokens = make_split(cfg).tokens
    assert torch.allclose(last_logits(model, tokens), model(tokens)[:, -1], atol=1e-5)


def test_short_training_memorises_the_training_pairs(trained):
    hist = trained.state.history
    assert [r["step"] for r in hist][:2] == [25, 50] and trained.state.step == 300
    first, last = hist[0], hist[-1]
    assert last["train_loss"] < 0.5 * first["train_loss"]
    assert last["train_acc"] > 0.9 > first["train_acc"]  # memorised (test accuracy may lag: grokking)
    assert last["test_acc"] > 2 / 23  # well above chance on the held-out pairs


def test_fourier_basis_is_orthonormal_and_spectrum_adds_up():
    for p in (5, 23, 113):
        basis, names = fourier_basis(p)
        assert basis.shape == (p, p) and names[:3] == ["const", "cos 1", "sin 1"]
        assert torch.allclose(basis @ basis.T, torch.eye(p, dtype=basis.dtype), atol=1e-12)
    basis, _ = fourier_basis(7)
    W = basis[[3, 4]].T @ torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=basis.dtype)  # all of it at k = 2
    W = W + 0.5 * basis[0][:, None]
    constant, fr = embedding_spectrum(W, basis)
    assert math.isclose(constant, 0.25 * 2 / (0.25 * 2 + 5), rel_tol=1e-9)
    assert torch.allclose(fr, torch.tensor([0.0, 1.0, 0.0], dtype=fr.dtype), atol=1e-12)
    assert key_frequencies(torch.tensor([0.05, 0.5, 0.1, 0.35]), 0.9) == [2, 3, 4]
    assert key_frequencies(torch.tensor([0.05, 0.5, 0.1, 0.35]), 0.85) == [2, 4]


def test_ablating_no_frequency_changes_nothing_and_all_leaves_one_answer(trained):
    model, cfg = trained.model, trained.config
    split = make_split(cfg)
    basis, _ = fourier_basis(cfg.p)
    W = model.W_E.detach()[:cfg.p].double()
    everything = list(range(1, (cfg.p - 1) // 2 + 1))
    assert torch.equal(ablate_frequencies(W, [], basis), W)
    flat = ablate_frequencies(W, everything, basis)
    assert torch.allclose(flat, W.mean(0, keepdim=True).expand_as(W), atol=1e-10)  # only the mean is left
    # Ablate some and the rest: the two parts add back to the embedding less its mean.
    some = [1, 4, 7]
    rest = [k for k in everything if k not in some]
    parts = ablate_frequencies(W, some, basis) + ablate_frequencies(W, rest, basis)
    assert torch.allclose(parts, W + W.mean(0, keepdim=True), atol=1e-10)

    x, y = split.tokens[split.test], split.labels[split.test]
    acc, loss = ablated_accuracy(model, x, y, [], basis)
    with torch.no_grad():
        logits = model(x)[:, -1]
    assert acc == int((logits.argmax(-1) == y).sum()) / len(y)
    assert math.isclose(loss, float(torch.nn.functional.cross_entropy(logits, y)), rel_tol=1e-5)
    # With every frequency gone, every number embeds alike: one answer for every pair.
    acc, _ = ablated_accuracy(model, x, y, everything, basis)
    counts = torch.bincount(y, minlength=cfg.p)
    assert acc in {counts[c].item() / len(y) for c in range(cfg.p)}


def test_analysis_summary_files_and_section(trained, tmp_path):
    analysis = analyze(trained)
    s = analysis.summary
    assert len(s["frequency_fractions"]) == 11 and math.isclose(sum(s["frequency_fractions"]), 1.0, rel_tol=1e-9)
    assert s["key_norm_fraction"] >= 0.9 and s["n_key_frequencies"] == len(s["key_frequencies"])
    assert s["chance"] == 1 / 23 and 0 <= s["test_acc_key_ablated"] <= 1
    json.dumps(s)
    for name, writer in analysis.files().items():
        writer(tmp_path / name)
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    section = analysis.sections()[0]
    assert section.id == "modular-addition" and section.html.count("data:image/png;base64,") == 2


def test_checkpoint_round_trip_and_resume(tmp_path):
    cfg = ModularAdditionConfig(**SMALL, steps=60)
    first = train(cfg, out=tmp_path / "run", progress=False, device="cpu")
    back = load(tmp_path / "run", device="cpu")
    assert back.config == cfg and back.state.step == 60 and back.state.history == first.state.history
    tokens = make_split(cfg).tokens
    assert torch.equal(back.model(tokens), first.model(tokens))
    more = train(ModularAdditionConfig(**{**SMALL, "steps": 80}), out=tmp_path / "run", progress=False,
                 device="cpu", resume=True)
    straight = train(ModularAdditionConfig(**SMALL, steps=80), progress=False, device="cpu")
    assert more.state.step == 80
    for a, b in zip(more.model.parameters(), straight.model.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ToyError, match="p=23"):
        train(ModularAdditionConfig(**{**SMALL, "p": 29}), out=tmp_path / "run", progress=False, device="cpu",
              resume=True)


@pytest.mark.parametrize("change, field", [
    (dict(p=2), "p"), (dict(p=21), "p"), (dict(frac_train=0.0), "frac_train"), (dict(frac_train=1.0), "frac_train"),
    (dict(frac_train=0.001, p=5), "frac_train"), (dict(d_mlp=0), "d_mlp"), (dict(lr=0.0), "lr"),
    (dict(betas=(0.9,)), "betas"), (dict(stop_after_grok=-2), "stop_after_grok"),
    (dict(key_fraction=1.5), "key_fraction"),
])
def test_bad_configs_name_the_field(change, field):
    with pytest.raises(ToyError, match=rf"ModularAdditionConfig\.{field}:"):
        ModularAdditionConfig(**change)


def test_cli_train_then_analyze(tmp_path):
    runner = CliRunner()
    sets = [x for k, v in SMALL.items() if k != "stop_after_grok" for x in ("--set", f"{k}={v}")]
    res = runner.invoke(app, ["toy", "train", "modular-addition", "--out", str(tmp_path / "m"), *sets,
                              "--steps", "50", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "steps_trained: 50" in res.output
    res = runner.invoke(app, ["toy", "analyze", "modular-addition", "--model", str(tmp_path / "m"),
                              "--out", str(tmp_path / "r"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["analysis.json", "fourier.png", "grokking.png",
                                                                  "report.html"]
    summary = json.loads((tmp_path / "r" / "analysis.json").read_text())
    assert summary["p"] == 23 and summary["steps_trained"] == 50
    res = runner.invoke(app, ["toy", "train", "modular-addition", "--out", str(tmp_path / "x"), "--set", "p=15"])
    assert res.exit_code == 2 and "p: must be prime" in res.output


def test_training_and_analysis_name_their_devices():
    with DeviceAudit() as audit:
        done = train(ModularAdditionConfig(**SMALL, steps=20), progress=False, device="cpu")
        analyze(done)
    assert not audit.leaks, audit.report()


@pytest.mark.gpu
def test_training_and_analysis_on_cuda():
    done = train(ModularAdditionConfig(**SMALL, steps=300), progress=False, device="cuda")
    assert done.model.W_E.device.type == "cuda"
    assert done.state.last("train_acc") > 0.9
    s = analyze(done).summary
    assert abs(s["test_acc"] - done.state.last("test_acc")) < 0.01  # hooked forward vs the fast one
    assert s["key_norm_fraction"] >= 0.9
