"""Probes: logistic-regression probes (dense, L1, top-k) on synthetic data, the control task, CCS on a
planted direction, the per-layer study on a tiny model, save/load with the model's fingerprint, the
direction checks, the CLI, and a device audit of a probe fit and CCS."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

import mechscope
from devicecheck import DeviceAudit
from mechscope.cli import app
from mechscope.probes.activations import ActivationError
from mechscope.probes.ccs import ccs_loss, fit_ccs, orient_pairs
from mechscope.probes.concepts import ConceptError, ConceptSet, make_concept
from mechscope.probes.linear import ProbeError, control_labels, fit_probe, rank_neurons
from mechscope.probes.study import check_direction, load_probes, probe_direction, probe_layers, save_probes


def _separable(n=200, d=24, seed=0, margin=0.5, sparse=False):
    """n points on either side of a random hyperplane (on coordinates 3 and 5 only when `sparse`), at
    least `margin` from it."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    if sparse:
        w = torch.zeros(d)
        w[3], w[5] = 1.0, -0.7
    x = torch.randn(n * 3, d, generator=g)
    s = x @ w / w.norm()
    keep = s.abs() > margin
    x, s = x[keep][:n], s[keep][:n]
    return x, (s > 0).long(), w


def _exact_loss(x, y, w, b, l2):
    """The penalised log loss the L2 probe minimises, written out term by term (the penalty is on the
    weights of the standardised features: w times each feature's standard deviation)."""
    n = len(x)
    ws = w * x.std(0, unbiased=False)
    total = 0.0
    for i in range(n):
        z = float(x[i] @ w + b)
        total += math.log1p(math.exp(-z)) if y[i] == 1 else math.log1p(math.exp(z))
    return total / n + 0.5 * l2 * float(ws @ ws) / n


@pytest.mark.parametrize("kind", ["linear", "l1", "topk"])
def test_held_out_accuracy_is_one_on_a_linearly_separable_set(kind):
    x, y, w = _separable(sparse=kind != "linear")  # the sparse probes get a boundary on a few coordinates
    probe = fit_probe(x[:140], y[:140], "h", kind, k=4, l1=0.005)
    assert probe.accuracy(x[140:], y[140:]) == 1.0
    assert probe.metrics["train_accuracy"] == 1.0
    if kind == "topk":
        assert {3, 5} <= set(probe.neurons) and probe.sparsity <= 4
    if kind == "l1":
        assert probe.sparsity < x.shape[1]  # L1 zeroes some weights
    direction = probe.direction()
    assert direction.shape == (x.shape[1],) and abs(float(direction.norm()) - 1) < 1e-5
    assert float(direction @ (w / w.norm())) > 0.8  # it points along the planted boundary's normal


def test_l2_probe_reaches_the_minimum_of_its_loss():
    x, y, _ = _separable(n=80, d=6, margin=0.0)
    y[:8] = 1 - y[:8]  # not separable: a finite optimum
    probe = fit_probe(x, y, "h", "linear", l2=2.0)
    best = _exact_loss(x, y, probe.weight, probe.bias, 2.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):  # any perturbation costs loss
        dw = 1e-2 * torch.randn(6, generator=g)
        assert _exact_loss(x, y, probe.weight + dw, probe.bias, 2.0) > best - 1e-9
        assert _exact_loss(x, y, probe.weight, probe.bias + 1e-2, 2.0) > best - 1e-9


def test_rank_neurons_puts_the_informative_feature_first():
    x, y, _ = _separable()
    x[:, 7] = (2 * y - 1).float() * 3 + 0.1 * torch.randn(len(y))
    assert int(rank_neurons(x, y)[0]) == 7


def test_control_task_is_near_chance_on_shuffled_labels_and_high_when_features_name_the_type():
    g = torch.Generator().manual_seed(0)
    n, n_types = 1200, 300
    types = [f"w{int(t)}" for t in torch.randint(0, n_types, (n,), generator=g)]
    ctrl = torch.tensor(control_labels(types, seed=3))
    assert {int(v) for v in ctrl} == {0, 1}
    assert all(ctrl[i] == ctrl[j] for i in range(50) for j in range(50) if types[i] == types[j])
    noise = torch.randn(n, 16, generator=g)  # features that know nothing of the word type
    probe = fit_probe(noise[:800], ctrl[:800], "h")
    assert abs(probe.accuracy(noise[800:], ctrl[800:]) - 0.5) < 0.08
    shuffled = ctrl[torch.randperm(n, generator=g)]
    probe = fit_probe(noise[:800], shuffled[:800], "h")
    assert abs(probe.accuracy(noise[800:], shuffled[800:]) - 0.5) < 0.08
    # features that carry the word type itself let the probe memorise the control labels
    few = [f"w{int(t[1:]) % 40}" for t in types]  # 40 types in 64 dimensions: any labelling of them is separable
    ctrl = torch.tensor(control_labels(few, seed=3))
    embed = torch.randn(40, 64, generator=g)
    feats = embed[torch.tensor([int(t[1:]) for t in few])] + 0.05 * torch.randn(n, 64, generator=g)
    probe = fit_probe(feats[:800], ctrl[:800], "h", l2=0.1)
    assert probe.accuracy(feats[800:], ctrl[800:]) > 0.95


def _planted_pairs(n=120, d=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    truth = torch.randint(0, 2, (n,), generator=g)
    sign = (2 * truth - 1).float()[:, None]
    xa = 3 * sign * u + torch.randn(n, d, generator=g) + 2.0  # each side has its own offset
    xb = -3 * sign * u + torch.randn(n, d, generator=g) - 1.0
    return xa, xb, truth, u


def test_ccs_loss_is_lowest_on_the_planted_direction_and_ccs_recovers_it():
    xa, xb, truth, u = _planted_pairs()
    na, nb = (xa - xa.mean(0)) / xa.std(0), (xb - xb.mean(0)) / xb.std(0)
    planted = float(ccs_loss(5 * u, 0.0, na, nb))
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        r = torch.randn(len(u), generator=g)
        assert planted < float(ccs_loss(5 * r / r.norm(), 0.0, na, nb))
    assert planted < 0.05
    xa, xb, truth, u = _planted_pairs(n=400)  # enough pairs to pin the direction down
    res = fit_ccs(xa[:280], xb[:280], xa[280:], xb[280:], truth[280:], seeds=4, steps=400)
    assert min(res.accuracies) == 1.0
    for d in res.directions:
        assert abs(float(d @ u)) > 0.85  # up to sign (a random unit vector in 20 dimensions: about 0.2)
    assert res.summary()["ccs_std"] == 0.0 and res.summary()["ccs_seeds"] == 4


def test_orient_pairs_draws_each_pair_order_and_reports_the_truth():
    pairs = [(2 * i, 2 * i + 1) for i in range(40)]
    a, b, truth = orient_pairs(pairs, seed=0)
    assert 5 < int(truth.sum()) < 35
    for (p, q), x, y, t in zip(pairs, a, b, truth.tolist()):
        assert (x, y) == ((p, q) if t == 1 else (q, p))


def test_bad_labels_and_activations_are_refused():
    x = torch.randn(10, 4)
    with pytest.raises(ProbeError, match="one class only"):
        fit_probe(x, [1] * 10)
    with pytest.raises(ProbeError, match="empty"):
        fit_probe(x[:0], [])
    with pytest.raises(ProbeError, match="3 labels for 10"):
        fit_probe(x, [0, 1, 0])
    with pytest.raises(ProbeError, match="0 or 1"):
        fit_probe(x, [0, 2] * 5)
    probe = fit_probe(x, [0, 1] * 5)
    with pytest.raises(ProbeError, match="do not fit the probe"):
        probe.accuracy(torch.randn(10, 5), [0, 1] * 5)
    with pytest.raises(ConceptError, match="only label 1"):
        ConceptSet("c", ["a", "b"], [1, 1], [], ["a", "b"])
    with pytest.raises(ConceptError, match="empty"):
        ConceptSet("c", [], [], [], [])
    with pytest.raises(mechscope.errors.ParameterError, match="unknown probe kind"):
        fit_probe(x, [0, 1] * 5, kind="svm")


# --- on a tiny model -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tiny_model_dirs):
    return {a: mechscope.load_model(str(tiny_model_dirs[a]), device="cpu") for a in ("llama", "gpt2")}


@pytest.fixture(scope="module")
def study(models):
    concept = make_concept("number", models["llama"].tokenizer, n=80)
    audit = DeviceAudit()
    with audit:
        result = probe_layers(models["llama"], concept, ccs_seeds=3, ccs_steps=200, progress=False)
    return result, audit


def test_per_layer_study_on_a_tiny_model_from_one_collect(models, monkeypatch):
    import mechscope.probes.study as study_mod

    calls = []
    real = study_mod.collect
    monkeypatch.setattr(study_mod, "collect", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    model = models["llama"]
    concept = make_concept("sentiment", model.tokenizer, n=60)
    result = probe_layers(model, concept, ccs_seeds=2, ccs_steps=50, progress=False)
    assert len(calls) == 1 and len(calls[0]) == model.cfg.n_layers  # all layers, one collect
    assert [r["layer"] for r in result.rows] == list(range(model.cfg.n_layers))
    for r in result.rows:
        for key in ("accuracy", "control_accuracy", "l1_accuracy", "topk_accuracy", "pair_accuracy", "ccs_mean"):
            assert 0 <= r[key] <= 1, key
        assert r["selectivity"] == pytest.approx(r["accuracy"] - r["control_accuracy"])
        assert r["ccs_min"] <= r["ccs_mean"] <= r["ccs_max"] and r["ccs_min"] >= 0.5
    assert result.n_train + result.n_test == len(concept)


def test_study_probes_score_what_they_report(study, models):
    result, audit = study
    assert audit.leaks == [], audit.report()
    from mechscope.probes.activations import collect

    concept = make_concept("number", models["llama"].tokenizer, n=80)
    _, test = concept.split(0.3, 0)
    acts = collect(models["llama"], test.texts, progress=False)
    for r in result.rows:
        probe = result.probes[r["hook_point"]]
        assert probe.accuracy(acts[r["hook_point"]], test.labels) == pytest.approx(r["accuracy"])


def test_save_load_round_trip_and_refusal_for_another_model(study, models, tmp_path):
    result, _ = study
    out = save_probes(tmp_path / "p", result.probes, models["llama"], meta={"concept": "number"})
    back = load_probes(out, models["llama"])
    assert list(back) == list(result.probes)
    for k, p in result.probes.items():
        assert torch.equal(back[k].weight, p.weight) and back[k].bias == p.bias and back[k].kind == p.kind
        assert back[k].metrics["accuracy"] == p.metrics["accuracy"]
    with pytest.raises(ProbeError, match=f"{tmp_path / 'p'}: these probes were fitted on"):
        load_probes(out, models["gpt2"])
    point, direction = probe_direction(out, models["llama"])
    assert point in result.probes and abs(float(direction.norm()) - 1) < 1e-5
    with pytest.raises(ProbeError, match="not a probe directory"):
        load_probes(tmp_path, models["llama"])
    with pytest.raises(mechscope.fileio.OutputError, match="not an empty directory"):
        save_probes(out, result.probes, models["llama"])


def test_directions_and_hook_points_are_checked(models):
    model = models["llama"]
    d = model.cfg.d_model
    got = check_direction(model, "blocks.0.hook_resid_post", torch.ones(d))
    assert abs(float(got.norm()) - 1) < 1e-6
    with pytest.raises(ProbeError, match=r"shape \(7,\) does not fit blocks.0.hook_resid_post"):
        check_direction(model, "blocks.0.hook_resid_post", torch.ones(7))
    z = check_direction(model, "blocks.0.attn.hook_z", torch.ones(model.cfg.n_heads * model.cfg.d_head))
    assert z.shape == (model.cfg.n_heads, model.cfg.d_head)
    with pytest.raises(ActivationError, match="unknown hook point 'blocks.0.hook_nothing'"):
        check_direction(model, "blocks.0.hook_nothing", torch.ones(d))
    concept = make_concept("truth", model.tokenizer, n=40)
    with pytest.raises(ActivationError, match="unknown hook point"):
        probe_layers(model, concept, ["blocks.9.hook_resid_post"], progress=False)


def test_cli_probe_train_on_a_tiny_model(tiny_model_dirs, tmp_path):
    runner = CliRunner()
    out = tmp_path / "rep"
    res = runner.invoke(app, ["probe", "train", "--concept", "truth", "--model", str(tiny_model_dirs["llama"]),
                              "--n", "40", "--ccs-seeds", "2", "--ccs-steps", "50", "--out", str(out),
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} == {"report.html", "summary.json", "probes.png", "probes"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["concept"] == "truth" and len(summary["rows"]) == 2
    assert 'id="probes"' in (out / "report.html").read_text()
    model = mechscope.load_model(str(tiny_model_dirs["llama"]), device="cpu")
    assert set(load_probes(out / "probes", model)) == {r["hook_point"] for r in summary["rows"]}
    # user data
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(json.dumps({"positive": f"the {w} is good", "negative": f"the {w} is bad"})
                              for w in ["cat", "dog", "car", "tree", "book", "ring", "park", "gift"]))
    res = runner.invoke(app, ["probe", "train", "--data", str(data), "--model", str(tiny_model_dirs["gpt2"]),
                              "--hook-point", "blocks.1.hook_resid_post", "--ccs-seeds", "0", "--out",
                              str(tmp_path / "rep2"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "rep2" / "summary.json").read_text())["concept"] == "mine"
    # bad input: one line each, exit 2, nothing written
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 1}\n')
    for args, msg in [(["--data", str(bad)], "every row has label 1"),
                      (["--concept", "colour"], "unknown concept 'colour'"),
                      ([], "exactly one of --concept"),
                      (["--concept", "truth", "--hook-point", "blocks.0.hook_nope"], "unknown hook point")]:
        res = runner.invoke(app, ["probe", "train", *args, "--model", str(tiny_model_dirs["llama"]), "--out",
                                  str(tmp_path / "rep3"), "--device", "cpu"])
        assert res.exit_code == 2 and msg in res.output, (args, res.output)
        assert not (tmp_path / "rep3").exists()


@pytest.mark.gpu
def test_probe_study_on_cuda(tiny_model_dirs, tmp_path):
    model = mechscope.load_model(str(tiny_model_dirs["llama"]), device="cuda")
    concept = make_concept("sentiment", model.tokenizer, n=60)
    result = probe_layers(model, concept, ccs_seeds=2, ccs_steps=100, progress=False)
    assert all(0 <= r["accuracy"] <= 1 and "ccs_mean" in r for r in result.rows)
    out = save_probes(tmp_path / "p", result.probes, model)
    point, direction = probe_direction(out, model)
    assert direction.device.type == "cuda"
    acts = mechscope.probes.activations.collect(model, concept.texts[:8], [point], progress=False)[point]
    probe = load_probes(out, model)[point]
    assert probe.logits(acts.cuda()).device.type == "cuda"
    fit = fit_probe(acts.cuda(), concept.labels[:8], point)
    assert fit.weight.device.type == "cuda"
    xa, xb, truth, _ = _planted_pairs()
    res = fit_ccs(xa[:80].cuda(), xb[:80].cuda(), xa[80:].cuda(), xb[80:].cuda(), truth[80:].cuda(), seeds=2, steps=200)
    assert min(res.accuracies) == 1.0


@pytest.mark.slow
def test_number_is_linearly_decodable_in_smollm2(smollm2):
    """SmolLM2-135M, number concept, residual stream after layer 17 (the study's best layer): held-out
    accuracy 1.0 and selectivity 0.43 measured (benchmarks/study_probes.py); CCS agrees."""
    concept = make_concept("number", smollm2.tokenizer, n=200)
    result = probe_layers(smollm2, concept, ["blocks.17.hook_resid_post"], ccs_seeds=3, progress=False)
    row = result.rows[0]
    assert row["accuracy"] >= 0.9 and row["selectivity"] >= 0.2 and row["ccs_mean"] >= 0.9
    assert result.behaviour["accuracy"] >= 0.7  # verb agreement on the held-out prompts
