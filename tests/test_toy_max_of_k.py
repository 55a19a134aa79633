"""Max-of-K with compact proofs: the config, seeded training, checkpoints, the exact path decomposition,
the brute-force proof against a per-input loop, and the soundness of every mechanism proof against
brute force on small vocabularies (random and briefly trained models)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from devicecheck import DeviceAudit
from typer.testing import CliRunner

from mechscope.cli import app
from mechscope.toys import ToyError, get_toy
from mechscope.toys.max_of_k import (MaxOfKConfig, _inputs, analyze, brute_force, build_model, class_counts, load,
                                     margins_of, mechanism_proof, path_tables, positional_certified, positional_classes,
                                     positional_proof, sample, train)


def test_defaults_are_the_papers_and_impossible_configs_name_their_field():
    cfg = MaxOfKConfig()
    assert (cfg.d_vocab, cfg.k, cfg.n_ctx, cfg.d_model, cfg.d_head) == (64, 4, 4, 32, 32)
    model = build_model(cfg)
    assert model.cfg.n_layers == 1 and model.cfg.n_heads == 1 and model.cfg.d_mlp == 0
    assert model.cfg.attention_dir == "causal" and model.cfg.normalization_type is None
    with pytest.raises(ToyError, match=r"k = 5 is larger than the context n_ctx = 4"):
        MaxOfKConfig(k=5)
    with pytest.raises(ToyError, match=r"MaxOfKConfig.k must be at least 1"):
        MaxOfKConfig(k=0)
    with pytest.raises(ToyError, match=r"MaxOfKConfig.d_vocab must be at least 2"):
        MaxOfKConfig(d_vocab=1)
    with pytest.raises(ToyError, match=r"MaxOfKConfig.lr"):
        MaxOfKConfig(lr=0.0)
    assert get_toy("max-of-k").config is MaxOfKConfig


@pytest.mark.parametrize("d_vocab,k", [(5, 1), (6, 2), (5, 3), (4, 4)])
def test_class_counts_match_enumeration(d_vocab, k):
    want = torch.zeros(d_vocab, d_vocab, d_vocab + 1, dtype=torch.int64)
    for seq in itertools.product(range(d_vocab), repeat=k):
        m = max(seq)
        below = [t for t in seq if t < m]
        want[m, seq[-1], (max(below) if below else -1) + 1] += 1
    assert torch.equal(class_counts(d_vocab, k), want)
    assert int(want.sum()) == d_vocab ** k


def test_the_path_tables_reproduce_the_models_logits():
    cfg = MaxOfKConfig(d_vocab=10, k=3, n_ctx=5, d_model=12, d_head=6, seed=4)
    model = build_model(cfg)
    with torch.no_grad():  # biases start at zero: give them values so their paths are checked too
        for p in (model.b_U, model.blocks[0].attn.b_Q, model.blocks[0].attn.b_K, model.blocks[0].attn.b_V,
                  model.blocks[0].attn.b_O):
            p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    tables = path_tables(model, cfg.k)
    tokens = sample(cfg, 200, seed=1, device="cpu")
    pos = torch.arange(cfg.k)[None]
    attn = torch.softmax(tables.S[tokens[:, -1:], pos, tokens], -1)
    logits = tables.D[tokens[:, -1]] + (attn[..., None] * tables.V[pos, tokens]).sum(1)
    assert torch.allclose(logits, model(tokens)[:, cfg.k - 1].double(), atol=1e-5)


def test_brute_force_equals_a_per_input_loop():
    cfg = MaxOfKConfig(d_vocab=5, k=3, n_ctx=3, d_model=8, d_head=4, seed=2)
    model = build_model(cfg)
    proof = brute_force(model, cfg.k, batch=17, keep_margins=True)
    right, margins = 0, []
    with torch.no_grad():
        for seq in itertools.product(range(5), repeat=3):
            logits = model(torch.tensor([seq]))[0, -1]
            others = torch.cat([logits[: max(seq)], logits[max(seq) + 1:]])
            margins.append(float(logits[max(seq)] - others.max()))
            right += margins[-1] > 0
    assert proof.total == 125 and proof.certified == right and proof.bound == right / 125
    assert torch.allclose(proof.detail["margins"], torch.tensor(margins), atol=1e-6)
    assert torch.equal(_inputs(0, 125, 5, 3, "cpu"), torch.tensor(list(itertools.product(range(5), repeat=3))))


def _assert_sound(model, k):
    """Every input of every class a mechanism proof certifies is right, and the bounds are below brute force."""
    brute = brute_force(model, k, keep_margins=True)
    d = model.cfg.d_vocab
    tokens = _inputs(0, d ** k, d, k, "cpu")
    m = tokens.max(-1).values
    below = torch.where(tokens < m[:, None], tokens, -1).max(-1).values
    bounds = {}
    for per_output in (True, False):
        proof = mechanism_proof(model, k, per_output=per_output)
        certified = proof.detail["classes"][m, tokens[:, -1], below + 1]
        assert int(certified.sum()) == proof.certified
        assert bool((brute.detail["margins"][certified] > 0).all()), proof.strategy
        assert proof.bound <= brute.bound
        assert 0 < proof.flops < brute.flops
        bounds[proof.strategy] = proof.bound
    assert bounds["cubic"] <= bounds["per_output"]  # the cubic proof takes the worst terms apart
    bounds["positional"] = _assert_positional_sound_and_exact(model, k, tokens, brute)
    # each positional class lies inside one (m, q, c) class and its worst case is exact, so it certifies more
    assert bounds["positional"] >= bounds["per_output"]
    return brute.bound, bounds


def _positional_class_keys(tokens):
    """Each input's positional class, computed here by a plain loop: (m, q, c, labels of the earlier positions)."""
    keys = []
    for row in tokens.tolist():
        m, earlier = max(row), row[:-1]
        c = max([t for t in earlier if t < m], default=-1)
        keys.append((m, row[-1], c, tuple("m" if t == m else "c" if t == c else "b" for t in earlier)))
    return keys


def _assert_positional_sound_and_exact(model, k, tokens, brute):
    """The positional proof certifies only right inputs, counts them exactly, and its worst case is exact:
    a class is certified exactly when every input in it beats every wrong logit by more than the slack
    (each input's logits rebuilt in float64 from the path tables)."""
    proof = positional_proof(model, k)
    certified = positional_certified(proof, tokens)
    assert int(certified.sum()) == proof.certified
    assert bool((brute.detail["margins"][certified] > 0).all())
    assert proof.bound <= brute.bound and 0 < proof.flops < brute.flops
    tables = path_tables(model, k)
    pos = torch.arange(k)[None]
    attn = torch.softmax(tables.S[tokens[:, -1:], pos, tokens], -1)
    logits = tables.D[tokens[:, -1]] + (attn[..., None] * tables.V[pos, tokens]).sum(1)
    margin64 = margins_of(logits, tokens.max(-1).values)
    worst = {}
    for key, margin in zip(_positional_class_keys(tokens), margin64.tolist()):
        worst[key] = min(worst.get(key, float("inf")), margin)
    assert {key[3] for key in worst} <= set(positional_classes(k))
    for key, certified_here in zip(_positional_class_keys(tokens), certified.tolist()):
        slack = proof.detail["slack"]
        if abs(worst[key] - slack) > 1e-9:  # away from a tie at the threshold, the verdict is the exact one
            assert certified_here == (worst[key] > slack), key
    return proof.bound


@pytest.mark.parametrize("d_vocab,k,seed,scale", [(8, 3, 0, 1.0), (10, 4, 1, 1.0), (12, 3, 2, 3.0), (9, 2, 3, 2.0)])
def test_mechanism_proofs_are_sound_on_random_models(d_vocab, k, seed, scale):
    model = build_model(MaxOfKConfig(d_vocab=d_vocab, k=k, n_ctx=k, d_model=16, d_head=16, seed=seed))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    _assert_sound(model, k)


@pytest.fixture(scope="module")
def short_run():
    cfg = MaxOfKConfig(d_vocab=10, k=3, n_ctx=3, d_model=16, d_head=16, steps=400, batch=128, lr=1e-2,
                       weight_decay=0.1, eval_every=100, seed=0)
    return train(cfg, device="cpu", progress=False)


def test_short_training_learns_the_max_and_the_proofs_certify_part_of_it(short_run):
    history = short_run.state.history
    # always answering the most frequent maximum (d_vocab - 1) is right 27% of the time
    assert history[-1]["accuracy"] > 0.8 and history[-1]["loss"] < history[0]["loss"]
    accuracy, bounds = _assert_sound(short_run.model, 3)
    assert accuracy > 0.8
    assert bounds["per_output"] > 0.3  # the mechanism already carries a proof of much of it
    assert bounds["positional"] > 0.9 * accuracy  # the exact per-class worst case certifies nearly all of it


@pytest.mark.parametrize("k", [3, 4])
def test_mechanism_proofs_are_sound_on_briefly_trained_models(k):
    cfg = MaxOfKConfig(d_vocab=9, k=k, n_ctx=k, d_model=16, d_head=16, steps=150, lr=1e-2, weight_decay=0.1,
                       eval_every=50, seed=k)
    trained = train(cfg, device="cpu", progress=False)
    _assert_sound(trained.model, k)


def test_checkpoint_round_trip_and_resume(tmp_path):
    cfg = MaxOfKConfig(d_vocab=8, k=3, n_ctx=3, d_model=8, d_head=8, steps=40, eval_every=10, seed=5)
    out = tmp_path / "ckpt"
    first = train(cfg, out=out, device="cpu", progress=False)
    back = load(out, device="cpu")
    assert back.config == cfg and back.state.step == 40
    tokens = sample(cfg, 32, seed=3, device="cpu")
    assert torch.equal(back.model(tokens), first.model(tokens))
    longer = MaxOfKConfig(**{**vars(cfg), "steps": 60})
    resumed = train(longer, out=out, device="cpu", progress=False, resume=True)
    straight = train(longer, device="cpu", progress=False)
    assert resumed.state.step == 60
    for a, b in zip(resumed.model.parameters(), straight.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ToyError, match="another config"):
        train(MaxOfKConfig(**{**vars(longer), "seed": 6}), out=out, device="cpu", progress=False, resume=True)


def test_cli_train_then_analyze(tmp_path):
    runner = CliRunner()
    ckpt, report = tmp_path / "model", tmp_path / "report"
    result = runner.invoke(app, ["toy", "train", "max-of-k", "--out", str(ckpt), "--set", "d_vocab=8", "--set", "k=3",
                                 "--set", "n_ctx=3", "--set", "d_model=16", "--set", "d_head=16", "--steps", "60",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["toy", "analyze", "max-of-k", "--model", str(ckpt), "--out", str(report),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in report.iterdir()) == ["analysis.json", "bound_vs_cost.png", "report.html"]
    summary = json.loads((report / "analysis.json").read_text())
    assert summary["inputs"] == 512 and summary["brute_force_bound"] == summary["accuracy"]
    assert summary["per_output_bound"] <= summary["accuracy"] and summary["cubic_bound"] <= summary["per_output_bound"]
    assert summary["per_output_bound"] <= summary["positional_bound"] <= summary["accuracy"]
    assert "data:image/png;base64," in (report / "report.html").read_text()
    bad = runner.invoke(app, ["toy", "train", "max-of-k", "--out", str(tmp_path / "bad"), "--set", "k=9"])
    assert bad.exit_code == 2 and "n_ctx" in bad.output


def test_train_and_analyze_name_their_devices():
    cfg = MaxOfKConfig(d_vocab=6, k=3, n_ctx=3, d_model=8, d_head=8, steps=5, eval_every=5)
    with DeviceAudit() as audit:
        analyze(train(cfg, device="cpu", progress=False), progress=False)
    assert not audit.leaks, audit.report()


@pytest.mark.gpu
def test_training_and_proofs_on_cuda():
    cfg = MaxOfKConfig(d_vocab=10, k=3, n_ctx=3, d_model=16, d_head=16, steps=300, lr=1e-2, weight_decay=0.1,
                       eval_every=100)
    trained = train(cfg, device="cuda", progress=False)
    assert trained.model.W_E.device.type == "cuda"
    result = analyze(trained, progress=False)
    cpu = brute_force(trained.model.to("cpu"), 3)
    assert abs(result.accuracy - cpu.bound) <= 2 / 1000  # float32 on another device: a tie may flip
    assert result.summary["per_output_bound"] <= result.summary["positional_bound"] <= result.accuracy
