"""The superposition toy (Elhage et al. 2022): a short training already stores the m most important dense
features orthogonally and more than m sparse ones; the geometry against a plain loop; checkpoints, resume,
bad configs, the CLI, and the device audit of training and analysis."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from devicecheck import DeviceAudit
from mechscope.cli import app
from mechscope.toys import ToyError, get_toy
from mechscope.toys.registry import parse_overrides
from mechscope.toys.superposition import (SuperpositionConfig, SuperpositionModel, analyze, feature_geometry, load,
                                          train)

# Short but enough for the start of the effect: 2 instances of S = 0 and of S = 0.95, 600 steps at lr 1e-2.
SHORT = dict(steps=600, lr=1e-2, sparsities=(0.0, 0.95), instances_per_sparsity=2, batch_size=512, eval_every=200)
TINY = dict(n_features=6, d_hidden=2, sparsities=(0.0, 0.9), instances_per_sparsity=1, batch_size=64, eval_every=10)


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp") / "ckpt"
    audit = DeviceAudit()
    with audit:
        trained = train(SuperpositionConfig(**SHORT), out=out, device="cpu", progress=False)
        analysis = analyze(trained, progress=False)
        analysis.sections()
    return out, trained, analysis, audit


def test_dense_features_are_stored_like_pca_and_sparse_ones_in_superposition(short):
    _, trained, analysis, _ = short
    m = trained.config.d_hidden
    dense, sparse = analysis.rows
    assert dense["stored"] == list(range(m))  # exactly the m most important
    assert dense["max_abs_cos"] < 0.1
    assert analysis.summary["dense_top_m"] is True
    assert sparse["n_stored"] > m + 5
    assert analysis.summary["superposition"] is True
    # a stored dense feature has a dimension of its own; the sparse ones share the m dimensions
    # (after 600 steps the dropped dense features still have small norms, so D_i is not yet 1)
    assert min(dense["dimensionality"][i] for i in dense["stored"]) > 0.6
    assert max(sparse["dimensionality"][i] for i in sparse["stored"]) < 0.6
    assert sparse["sum_dimensionality"] == pytest.approx(m, abs=0.5)
    assert trained.state.history[-1]["step"] == SHORT["steps"]
    assert trained.state.history[-1]["eval_loss"] < trained.state.history[0]["eval_loss"]


def test_training_and_analysis_name_their_devices(short):
    audit = short[3]
    assert not audit.leaks, "tensors created without a device in mechscope:\n" + audit.report()


def test_the_checkpoint_loads_back_to_the_same_model_and_analysis(short):
    out, trained, analysis, _ = short
    back = load(out, device="cpu")
    assert back.config == trained.config
    assert back.state.step == trained.state.step and back.state.history == trained.state.history
    for k, v in trained.model.state_dict().items():
        assert torch.equal(back.model.state_dict()[k], v.cpu()), k
    again = analyze(back, progress=False)
    assert again.summary == analysis.summary


def test_resume_reaches_the_same_weights_as_one_run(tmp_path):
    cfg = SuperpositionConfig(**TINY, steps=40)
    whole = train(cfg, device="cpu", progress=False)
    train(SuperpositionConfig(**TINY, steps=20), out=tmp_path / "c", device="cpu", progress=False)
    resumed = train(cfg, out=tmp_path / "c", device="cpu", progress=False, resume=True)
    assert resumed.state.step == 40
    assert torch.allclose(resumed.model.W, whole.model.W, atol=1e-6)
    with pytest.raises(ToyError, match="lr"):
        train(SuperpositionConfig(**TINY, steps=60, lr=0.5), out=tmp_path / "c", device="cpu", progress=False,
              resume=True)


def test_geometry_matches_a_plain_loop():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(3, 7, generator=g, dtype=torch.float64)
    W[:, 5] = -0.8 * W[:, 0]  # an antipodal pair with feature 0
    W[:, 6] = 0.0  # a feature left out
    geo = feature_geometry(W)
    for i in range(7):
        ni = math.sqrt(sum(float(W[k, i]) ** 2 for k in range(3)))
        assert geo["norms"][i] == pytest.approx(ni, abs=1e-12)
        if ni == 0:
            assert geo["dimensionality"][i] == 0.0
            continue
        dots = [sum(float(W[k, i]) * float(W[k, j]) for k in range(3)) / ni for j in range(7)]
        assert geo["interference"][i] == pytest.approx(sum(d * d for j, d in enumerate(dots) if j != i), rel=1e-9)
        assert geo["dimensionality"][i] == pytest.approx(ni ** 2 / sum(d * d for d in dots), rel=1e-9)
    assert geo["stored"] == [i for i in range(7) if geo["norms"][i] > 0.5]
    assert [0, 5] in geo["antipodal_pairs"]
    assert geo["max_abs_cos"] == pytest.approx(1.0)
    # orthonormal features: each gets a whole dimension and none interferes
    eye = feature_geometry(torch.eye(3, 4))
    assert eye["dimensionality"][:3] == [1.0, 1.0, 1.0] and eye["interference"] == [0.0] * 4
    assert eye["stored"] == [0, 1, 2] and eye["max_abs_cos"] == 0.0


def test_inputs_have_the_configured_sparsity_and_the_loss_its_weights():
    cfg = SuperpositionConfig(n_features=10, d_hidden=3, sparsities=(0.0, 0.5, 0.9), instances_per_sparsity=1)
    model = SuperpositionModel(cfg).init_weights(0)
    x = model.batch(20000, seed=1)
    zero = (x == 0).double().mean(dim=(0, 2))
    assert torch.allclose(zero, torch.tensor([0.0, 0.5, 0.9], dtype=torch.float64), atol=0.01)
    assert x.min() >= 0 and x.max() <= 1
    assert torch.equal(x, model.batch(20000, seed=1)) and not torch.equal(x, model.batch(20000, seed=2))
    small = x[:5]
    out = model(small)
    want = torch.stack([sum(0.9 ** i * (small[b, k, i] - out[b, k, i]) ** 2 for b in range(5) for i in range(10)) / 50
                        for k in range(3)])
    assert torch.allclose(model.instance_losses(small), want, atol=1e-6)


@pytest.mark.parametrize("kw, field", [
    (dict(d_hidden=20), "d_hidden"), (dict(d_hidden=25), "d_hidden"), (dict(n_features=0), "n_features"),
    (dict(sparsities=(0.5, 1.0)), "sparsities"), (dict(sparsities=(-0.1,)), "sparsities"),
    (dict(sparsities=()), "sparsities"), (dict(batch_size=0), "batch_size"), (dict(steps=-1), "steps"),
    (dict(instances_per_sparsity=0), "instances_per_sparsity"), (dict(lr=0.0), "lr"),
    (dict(importance_decay=1.5), "importance_decay"),
])
def test_impossible_configs_name_their_field(kw, field):
    with pytest.raises(ToyError, match=field):
        SuperpositionConfig(**kw)


def test_overrides_and_registry():
    toy = get_toy("superposition")
    assert toy.config is SuperpositionConfig and toy.train is train
    cfg = parse_overrides(SuperpositionConfig, ["sparsities=0,0.9", "d_hidden=3", "lr=0.01"])
    assert cfg.sparsities == (0.0, 0.9) and cfg.d_hidden == 3 and cfg.lr == 0.01
    with pytest.raises(ToyError, match="sparsities"):
        parse_overrides(SuperpositionConfig, ["sparsities=0,1"])


def test_cli_trains_and_analyzes(tmp_path):
    runner = CliRunner()
    sets = [x for kv in ("n_features=6", "d_hidden=2", "sparsities=0,0.9", "instances_per_sparsity=1",
                         "batch_size=64", "eval_every=10") for x in ("--set", kv)]
    res = runner.invoke(app, ["toy", "train", "superposition", "--out", str(tmp_path / "m"), *sets, "--steps", "30",
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "m" / "toy.json").read_text())["step"] == 30
    res = runner.invoke(app, ["toy", "analyze", "superposition", "--model", str(tmp_path / "m"), "--out",
                              str(tmp_path / "r"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "dense_n_stored" in res.output
    names = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert names == ["analysis.json", "report.html", "superposition-dimensionality.png",
                     "superposition-interference.png", "superposition-phase.png"]
    assert (tmp_path / "r" / "superposition-phase.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "r" / "report.html").read_text()
    assert "data:image/png;base64," in page and "features stored" in page
    summary = json.loads((tmp_path / "r" / "analysis.json").read_text())
    assert len(summary["rows"]) == 2 and summary["steps"] == 30
    bad = runner.invoke(app, ["toy", "train", "superposition", "--out", str(tmp_path / "x"), "--set", "d_hidden=30"])
    assert bad.exit_code == 2 and "d_hidden" in bad.output


@pytest.mark.gpu
def test_short_training_and_analysis_on_cuda(tmp_path):
    trained = train(SuperpositionConfig(**SHORT), out=tmp_path / "c", device="cuda", progress=False)
    assert trained.model.W.device.type == "cuda"
    analysis = analyze(trained, progress=False)
    assert analysis.summary["dense_top_m"] and analysis.summary["dense_max_abs_cos"] < 0.1
    assert analysis.summary["sparsest_n_stored"] > trained.config.d_hidden
    back = load(tmp_path / "c", device="cuda")
    assert torch.equal(back.model.W, trained.model.W)
