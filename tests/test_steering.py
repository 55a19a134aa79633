"""Steering vectors, steering, directional ablation and their measurement, on tiny random models."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from devicecheck import DeviceAudit
from mechscope.cli import app
from mechscope.steering import (SteeringError, SteeringVector, ablated, actadd, caa, caa_many, from_decoder_row,
                                from_direction, generate, residual_writes, steered)
from mechscope.probes.activations import prompt_logits
from mechscope.steering.measure import ablation_effect, behaviour_scores, sweep

POS = ["When Mary and John went to the store", "The designer was good friends with the analyst",
       "Alice gave a book to Bob", "The war lasted from the year 1732"]
NEG = ["When Tom and Anna went to the park", "The nurse was good friends with the doctor because",
       "Kate gave a ring", "The year 17"]
PROMPT = "When Mary and John went to the store, John gave a drink to"
HOOK = "blocks.1.hook_resid_post"


def _vector(model, seed=0, hook=HOOK):
    g = torch.Generator().manual_seed(seed)
    return from_direction(model, torch.randn(model.cfg.d_model, generator=g), hook)


def _tokens(model, text=PROMPT):
    from mechscope.probes.activations import tokenize_texts

    return torch.tensor(tokenize_texts(model.tokenizer, [text]), dtype=torch.long)


def _behaviour(logits):
    return logits[:, 10] - logits[:, 11]


def test_alpha_zero_changes_nothing_and_alpha_one_does(tiny_model):
    tokens = _tokens(tiny_model)
    plain = tiny_model(tokens)
    vec = _vector(tiny_model)
    with steered(tiny_model, vec, 0.0):
        zero = tiny_model(tokens)
    with steered(tiny_model, vec, 0.0, positions=[1, -1]):
        zero_some = tiny_model(tokens)
    with steered(tiny_model, vec, 1.0):
        one = tiny_model(tokens)
    assert torch.equal(plain, zero) and torch.equal(plain, zero_some)
    assert (plain - one).abs().max() > 1e-3
    assert torch.equal(tiny_model(tokens), plain)  # the hooks are gone after the block


def test_chosen_positions_steer_only_there(tiny_model):
    tokens = _tokens(tiny_model)
    vec = _vector(tiny_model, hook="blocks.0.hook_resid_post")
    got = {}

    def keep(act, hook):
        got["x"] = act.detach().clone()

    with tiny_model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", keep)]):
        tiny_model(tokens)
    base = got["x"]
    with steered(tiny_model, vec, 2.0, positions=[2, -1]):
        with tiny_model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", keep)]):
            tiny_model(tokens)
    diff = got["x"] - base
    n = tokens.shape[1]
    for p in range(n):
        want = 2.0 * vec.vector if p in (2, n - 1) else torch.zeros_like(vec.vector)
        torch.testing.assert_close(diff[0, p], want, atol=1e-5, rtol=1e-5)


def test_caa_equals_the_mean_activation_difference_by_hand(tiny_model):
    hooks = ["blocks.0.hook_resid_post", HOOK]
    vecs = caa_many(tiny_model, POS, NEG, hooks, batch_size=3)
    for hook in hooks:
        diffs = []
        for p, n in zip(POS, NEG):
            acts = []
            for text in (p, n):
                _, cache = tiny_model.run_with_cache(_tokens(tiny_model, text))
                acts.append(cache[hook][0, -1])
            diffs.append(acts[0] - acts[1])
        want = torch.stack(diffs).mean(0)
        torch.testing.assert_close(vecs[hook].vector, want, atol=1e-5, rtol=1e-4)
        assert vecs[hook].method == "caa" and vecs[hook].provenance["pairs"] == len(POS)
    one = caa(tiny_model, POS, NEG, HOOK)
    torch.testing.assert_close(one.vector, vecs[HOOK].vector)


def test_actadd_last_token_and_aligned(tiny_model):
    vec = actadd(tiny_model, POS[0], NEG[0], HOOK)
    _, c1 = tiny_model.run_with_cache(_tokens(tiny_model, POS[0]))
    _, c2 = tiny_model.run_with_cache(_tokens(tiny_model, NEG[0]))
    torch.testing.assert_close(vec.vector, c1[HOOK][0, -1] - c2[HOOK][0, -1], atol=1e-5, rtol=1e-4)
    assert vec.method == "actadd"
    aligned = actadd(tiny_model, "Alice gave a book", "Bob gave a ring", "blocks.0.hook_resid_post", aligned=True)
    _, a = tiny_model.run_with_cache(_tokens(tiny_model, "Alice gave a book"))  # both 5 tokens after BOS
    _, b = tiny_model.run_with_cache(_tokens(tiny_model, "Bob gave a ring"))
    h = "blocks.0.hook_resid_post"
    assert aligned.vector.shape == (6, tiny_model.cfg.d_model)  # BOS + 5 tokens
    torch.testing.assert_close(aligned.vector, a[h][0] - b[h][0], atol=1e-5, rtol=1e-4)
    with pytest.raises(SteeringError, match="equal token length"):
        actadd(tiny_model, "Alice", "When Mary and John went to the store", HOOK, aligned=True)


@pytest.mark.parametrize("with_ablation", [True, False])
def test_ablation_leaves_no_component_along_r(tiny_model, with_ablation):
    g = torch.Generator().manual_seed(3)
    r = torch.randn(tiny_model.cfg.d_model, generator=g) * 5  # not unit: ablated() normalises it
    u = r / r.norm()
    names = residual_writes(tiny_model) + [f"blocks.{l}.hook_resid_{k}" for l in range(tiny_model.cfg.n_layers)
                                           for k in ("pre", "mid", "post")]
    got = {}

    def keeper(name):
        def keep(act, hook):
            got[name] = act.detach().clone()
        return keep

    context = ablated(tiny_model, r) if with_ablation else steered(tiny_model, None)
    with context:
        with tiny_model.hooks(fwd_hooks=[(n, keeper(n)) for n in names]):
            tiny_model(_tokens(tiny_model))
    assert set(got) == set(names)
    worst = max(float((got[n] @ u).abs().max()) for n in names)
    if with_ablation:
        assert worst < 1e-5, worst
    else:
        assert worst > 1e-2  # the check would see a component that is there
    assert "hook_embed" in names and ("hook_pos_embed" in names) == (tiny_model.cfg.positional_embedding_type == "standard"
                                                                     and "rotary_emb.hook_in" not in tiny_model.hook_dict)


def test_steered_generation_equals_step_by_step_recomputation(tiny_model):
    vec = _vector(tiny_model, seed=1)
    alpha, positions = 6.0, [1, 2]

    def by_hand(do_sample, seed):
        """Recompute the whole sequence at each step with a hook written here."""
        delta = alpha * vec.vector

        def add(act, hook):
            act = act.clone()
            act[:, positions] += delta
            return act

        ids = _tokens(tiny_model)
        gen = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(6):
            with tiny_model.hooks(fwd_hooks=[(vec.hook_point, add)]):
                logits = tiny_model(ids)[0, -1]
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)) if do_sample else int(logits.argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        return out

    for do_sample in (False, True):
        got = generate(tiny_model, PROMPT, 6, vector=vec, alpha=alpha, positions=positions, do_sample=do_sample,
                       seed=5, stop_at_eos=False)
        assert got == by_hand(do_sample, 5)
    plain = generate(tiny_model, PROMPT, 6, stop_at_eos=False)
    pushed = generate(tiny_model, PROMPT, 6, vector=vec, alpha=40.0, stop_at_eos=False)
    assert plain != pushed
    assert generate(tiny_model, PROMPT, 6, vector=vec, alpha=0.0, stop_at_eos=False) == plain


def test_save_load_round_trip_and_refusals(tiny_model, tiny_model_dirs, tmp_path):
    import mechscope

    vec = caa(tiny_model, POS, NEG, HOOK)
    path = vec.save(tmp_path / "v.safetensors")
    back = SteeringVector.load(path, tiny_model)
    assert torch.equal(back.vector, vec.vector)
    assert (back.hook_point, back.method, back.model, back.provenance) == (vec.hook_point, vec.method, vec.model,
                                                                            vec.provenance)
    other_arch = "llama" if tiny_model.cfg.positional_embedding_type == "standard" else "gpt2"
    other = mechscope.load_model(str(tiny_model_dirs[other_arch]), device="cpu")
    with pytest.raises(SteeringError, match=str(path).replace(".", r"\.") + ": made on"):
        SteeringVector.load(path, other)
    small = SteeringVector(HOOK, torch.ones(7), "caa", vec.model).save(tmp_path / "small.safetensors")
    with pytest.raises(SteeringError, match="small.safetensors: the vector has size 7"):
        SteeringVector.load(small, tiny_model)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a tensor file")
    with pytest.raises(SteeringError, match="bad.safetensors: not a mechscope steering vector"):
        SteeringVector.load(bad)
    assert not list(tmp_path.glob(".*tmp"))


def test_unknown_hook_point_and_wrong_size_are_clear_errors(tiny_model):
    with pytest.raises(SteeringError, match="unknown hook point 'blocks.9.hook_resid_post'"):
        from_direction(tiny_model, torch.ones(tiny_model.cfg.d_model), "blocks.9.hook_resid_post")
    with pytest.raises(SteeringError, match=r"shape \(5,\).*needs \[64\]"):
        from_direction(tiny_model, torch.ones(5), HOOK)
    with pytest.raises(SteeringError, match="unknown hook point"):
        caa(tiny_model, POS, NEG, "nope")
    with pytest.raises(SteeringError, match="4 positive texts but 2"):
        caa(tiny_model, POS, NEG[:2], HOOK)
    with pytest.raises(SteeringError, match="must not be empty"):
        caa(tiny_model, [], [], HOOK)
    with pytest.raises(SteeringError, match=r"shape \(3,\)"):
        with ablated(tiny_model, torch.ones(3)):
            pass
    with pytest.raises(SteeringError, match="zero"):
        ablated(tiny_model, torch.zeros(tiny_model.cfg.d_model)).__enter__()
    wrong = SteeringVector(HOOK, torch.ones(9), "caa", "x")
    with pytest.raises(SteeringError, match="needs"):
        with steered(tiny_model, wrong, 1.0):
            pass
    row = from_decoder_row(tiny_model, torch.eye(tiny_model.cfg.d_model)[:10], HOOK, index=3)
    assert row.method == "dictionary" and int(row.vector.argmax()) == 3
    with pytest.raises(SteeringError, match="latent 12"):
        from_decoder_row(tiny_model, torch.eye(tiny_model.cfg.d_model)[:10], HOOK, index=12)


@torch.no_grad()
def test_sweep_measures_behaviour_and_side_effects_against_alpha(tiny_model):
    neutral = _tokens(tiny_model).repeat(2, 1)
    vecs = [_vector(tiny_model, seed=s, hook=f"blocks.{l}.hook_resid_post") for s, l in ((0, 0), (1, 1))]
    prompts = [PROMPT, "Alice and Bob"]
    result = sweep(tiny_model, vecs, [-2.0, 0.0, 2.0], _behaviour, prompts, neutral=neutral)
    assert len(result.points) == 6
    # each point checked against a direct computation
    base_lp = torch.log_softmax(tiny_model(neutral)[:, :-1], -1)
    target = neutral[:, 1:].unsqueeze(-1)
    for p in result.points:
        vec = next(v for v in vecs if v.hook_point == p.hook_point)
        with steered(tiny_model, vec, p.alpha):
            want = float(_behaviour(prompt_logits(tiny_model, prompts)).mean())
            lp = torch.log_softmax(tiny_model(neutral)[:, :-1], -1)
        kl = float((base_lp.exp() * (base_lp - lp)).sum(-1).mean())
        dloss = float(-(lp.gather(-1, target)).mean() + base_lp.gather(-1, target).mean())
        assert p.behaviour == pytest.approx(want, abs=1e-4)
        assert p.kl == pytest.approx(kl, abs=1e-5) and p.loss_change == pytest.approx(dloss, abs=1e-5)
        assert (p.kl == 0) == (p.alpha == 0)
    best = result.best()
    assert best is None or best.alpha != 0
    assert result.to_json()["points"][0]["alpha"] == -2.0


def test_prompt_logits_read_each_prompt_at_its_own_last_token(tiny_model):
    prompts = [PROMPT, "Alice and Bob"]
    batch = prompt_logits(tiny_model, prompts, batch_size=2)
    for i, p in enumerate(prompts):
        torch.testing.assert_close(batch[i], tiny_model(_tokens(tiny_model, p))[0, -1], atol=1e-4, rtol=1e-4)
    with pytest.raises(SteeringError, match="one number per prompt"):
        behaviour_scores(tiny_model, lambda logits: logits[:, :2], prompts)


def test_best_point_needs_a_real_effect():
    from mechscope.steering.measure import SteeringPoint, SteeringSweep

    pts = [SteeringPoint("h", 1, 0.0, 0.0, 0.0, 0.0, 0.0), SteeringPoint("h", 1, 0.1, 0.1, 0.1, 1e-4, 0.0),
           SteeringPoint("h", 1, 4.0, 2.0, 2.0, 0.5, 0.1), SteeringPoint("h", 2, 4.0, 1.8, 1.8, 0.2, 0.1)]
    best = SteeringSweep(pts, 0.0, 3.0).best()
    assert (best.layer, best.alpha) == (2, 4.0)  # the tiny alpha has the best ratio but not half the top effect
    assert SteeringSweep(pts, 0.0, 3.0).best(min_effect=0.05).alpha == 0.1


def test_ablation_effect_and_collect_under_ablation(tiny_model):
    from mechscope.probes.activations import collect

    r = _vector(tiny_model, seed=4).vector
    result = ablation_effect(tiny_model, r, _behaviour, [PROMPT], neutral=_tokens(tiny_model))
    with ablated(tiny_model, r):
        after = float(_behaviour(prompt_logits(tiny_model, [PROMPT])).mean())
        acts = collect(tiny_model, POS, [HOOK], progress=False)[HOOK]
    assert result.behaviour_after == pytest.approx(after, abs=1e-5)
    assert result.kl > 0
    assert float((acts @ (r / r.norm())).abs().max()) < 1e-5


def test_cli_steer_with_a_saved_vector(tiny_model, tiny_model_dirs, tmp_path):
    arch = "gpt2" if tiny_model.cfg.positional_embedding_type == "standard" else "llama"
    model_dir = str(tiny_model_dirs[arch])
    path = _vector(tiny_model, seed=2).save(tmp_path / "v.safetensors")
    runner = CliRunner()
    res = runner.invoke(app, ["steer", "--model", model_dir, "--vector", str(path), "--prompt", PROMPT,
                              "--alpha", "30", "--max-new-tokens", "4", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "without steering: " + PROMPT in res.output and "with steering:    " + PROMPT in res.output
    other = tiny_model_dirs["llama" if arch == "gpt2" else "gpt2"]
    res = runner.invoke(app, ["steer", "--model", str(other), "--vector", str(path), "--prompt", PROMPT, "--device", "cpu"])
    assert res.exit_code == 2 and "v.safetensors: made on" in res.output
    res = runner.invoke(app, ["steer", "--model", model_dir, "--vector", str(tmp_path / "none.safetensors"),
                              "--prompt", PROMPT])
    assert res.exit_code == 2 and "no such steering vector file" in res.output
    if arch == "gpt2":  # the sweep report, once
        out = tmp_path / "report"
        res = runner.invoke(app, ["steer", "sweep", "--model", model_dir, "--vector", str(path), "--alphas", "-4,0,4",
                                  "--positive-words", " Mary, John", "--negative-words", " Bob", "--prompt", PROMPT,
                                  "--neutral-count", "2", "--neutral-length", "8", "--max-new-tokens", "3",
                                  "--out", str(out), "--device", "cpu"])
        assert res.exit_code == 0, res.output
        assert {"report.html", "steering.json", "steering.png"} <= {f.name for f in out.iterdir()}
        assert "Sample generations" in (out / "report.html").read_text() or "best: none" in res.output
        res = runner.invoke(app, ["steer", "sweep", "--model", model_dir, "--vector", str(path), "--out",
                                  str(tmp_path / "r2")])
        assert res.exit_code == 2 and "--positive-words" in res.output


def test_no_device_leaks_in_caa_steering_ablation_and_measure(tiny_model):
    audit = DeviceAudit()
    with audit:
        vec = caa(tiny_model, POS, NEG, HOOK)
        generate(tiny_model, PROMPT, 3, vector=vec, alpha=2.0, positions=[1], do_sample=True)
        sweep(tiny_model, [vec], [0.0, 1.0], _behaviour, [PROMPT], neutral=_tokens(tiny_model))
        ablation_effect(tiny_model, vec, _behaviour, [PROMPT], neutral=_tokens(tiny_model))
    assert not audit.leaks, audit.report()


@pytest.mark.gpu
def test_steering_on_cuda(tiny_model_dirs):
    import mechscope

    model = mechscope.load_model(str(tiny_model_dirs["llama"]), device="cuda")
    vec = caa(model, POS, NEG, HOOK)
    tokens = _tokens(model).cuda()
    plain = model(tokens)
    with steered(model, vec, 0.0):
        assert torch.equal(model(tokens), plain)
    assert len(generate(model, PROMPT, 4, vector=vec, alpha=3.0, do_sample=True, stop_at_eos=False)) == 4
    result = sweep(model, [vec], [0.0, 2.0], _behaviour, [PROMPT], neutral=_tokens(model))
    assert result.points[1].kl > 0
    got = {}
    with ablated(model, vec):
        with model.hooks(fwd_hooks=[(HOOK, lambda a, hook: got.__setitem__("x", a))]):
            model(tokens)
    u = (vec.vector / vec.vector.norm()).cuda()
    assert float((got["x"] @ u).abs().max()) < 1e-4


@pytest.mark.slow
def test_caa_sentiment_steers_smollm2(smollm2):
    """On the real model: the CAA sentiment vector at a middle layer moves the sentiment behaviour
    in alpha's direction, with a KL that grows with |alpha|."""
    concepts = pytest.importorskip("mechscope.probes.concepts")
    concept = concepts.make_concept("sentiment", smollm2.tokenizer, n=60)
    pos = [concept.texts[i] for i, _ in concept.pairs]
    neg = [concept.texts[j] for _, j in concept.pairs]
    vec = caa(smollm2, pos, neg, "blocks.15.hook_resid_post")
    neutral = _tokens(smollm2, "The history of the city goes back to the middle ages, when a small town grew").repeat(2, 1)
    result = sweep(smollm2, [vec], [-2.0, 0.0, 1.0, 2.0], concept.behaviour.score, concept.behaviour.prompts,
                   neutral=neutral)
    by_alpha = {p.alpha: p for p in result.points}
    assert by_alpha[-2.0].effect < 0 < by_alpha[1.0].effect < by_alpha[2.0].effect
    assert 0 < by_alpha[1.0].kl < by_alpha[2.0].kl
