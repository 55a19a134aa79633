"""The induction toy: data, scores against a naive loop, a short training that starts the effect, the
trained fixture's heads and its PEAP circuit, save/load, bad configs, the CLI and the device audit.

tests/data/toy_induction is written by `benchmarks/bench_toy_induction.py --fixture tests/data/toy_induction`
(the default config, trained to its end)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from devicecheck import DeviceAudit
from mechscope.cli import app
from mechscope.toys import ToyError, get_toy
from mechscope.toys.induction import (
    SPANS,
    InductionConfig,
    analyze,
    head_scores,
    identify_heads,
    induction_task,
    key_edges,
    load,
    repeated_batch,
    train,
)
from mechscope.toys.registry import parse_overrides

FIXTURE = Path(__file__).parent / "data" / "toy_induction"
TINY = dict(d_vocab=32, lr=3e-3, n_ctx=16, d_model=32, n_heads=2, d_head=16, min_segment=3, max_segment=7,
            batch_size=32, n_eval=32, n_pairs=8, eval_every=10)


def tiny(**kw) -> InductionConfig:
    return InductionConfig(**{**TINY, **kw})


@pytest.fixture(scope="module")
def fixture_analysis():
    return analyze(load(FIXTURE), progress=False)


def test_sequences_repeat_their_segment_with_distinct_tokens():
    cfg = tiny()
    b = repeated_batch(cfg, 50, seed=3)
    assert b.tokens.shape == (50, cfg.n_ctx) and (b.tokens[:, 0] == 0).all()
    assert len(set(b.segment.tolist())) > 1  # the offset of the repeat varies
    for row, start, seg in zip(b.tokens.tolist(), b.start.tolist(), b.segment.tolist()):
        assert start + seg == cfg.n_ctx
        assert row[start:] == row[start - seg:start]
        assert len(set(row[1:start])) == start - 1 and 0 not in row[1:]
    assert torch.equal(repeated_batch(cfg, 50, seed=3).tokens, b.tokens)
    assert not torch.equal(repeated_batch(cfg, 50, seed=4).tokens, b.tokens)


def test_head_scores_equal_a_naive_loop():
    cfg = tiny()
    b = repeated_batch(cfg, 6, seed=1)
    t = cfg.n_ctx
    pattern = torch.rand(2, 6, 3, t, t, generator=torch.Generator().manual_seed(0)).tril()
    pattern = pattern / pattern.sum(-1, keepdim=True)
    prev, ind = head_scores(pattern, b)
    for l in range(2):
        for h in range(3):
            p = [float(pattern[l, i, h, q, q - 1]) for i in range(6) for q in range(1, t)]
            assert prev[l, h] == pytest.approx(sum(p) / len(p), abs=1e-6)
            d = [float(pattern[l, i, h, q, q - int(b.segment[i]) + 1]) for i in range(6)
                 for q in range(int(b.start[i]), t)]
            assert ind[l, h] == pytest.approx(sum(d) / len(d), abs=1e-6)


def test_heads_are_the_best_of_the_whole_model():
    prev = torch.tensor([[0.2, 0.1], [0.6, 0.0]])
    ind = torch.tensor([[0.0, 0.1], [0.3, 0.9]])
    assert identify_heads(prev, ind) == ((1, 0), (1, 1))  # a layer-1 previous-token head is not the mechanism
    assert identify_heads(prev.flip(0), ind) == ((0, 0), (1, 1))


def test_task_pairs_swap_A1_and_D1_so_the_answer_moves_from_B1_to_C1():
    data = induction_task(tiny(), n=20, seed=2)
    assert data.schema.spans == SPANS
    data.validate(n_ctx=16)
    for ex in data.examples:
        bounds = dict(zip(SPANS, ex.span_bounds()))
        at = {s: ex.clean[a] for s, (a, b) in bounds.items() if b - a == 1}
        assert at["A1"] == at["A2"] == ex.clean[-1] and ex.correct == [at["B1"]] and ex.wrong == [at["C1"]]
        assert len(set(ex.clean[1:-1])) == len(ex.clean) - 2  # distinct apart from the repeated A
        differ = [i for i, (x, y) in enumerate(zip(ex.clean, ex.counterfactual)) if x != y]
        assert differ == [bounds["A1"][0], bounds["D1"][0]]
        assert ex.counterfactual[bounds["D1"][0]] == ex.clean[-1]


def test_short_training_starts_the_effect():
    trained = train(tiny(steps=300), progress=False)
    first, last = trained.state.history[0], trained.state.history[-1]
    assert last["loss_repeat"] < 0.5 * last["loss_first"]  # the repeat has become predictable
    assert last["loss_repeat"] < first["loss_repeat"] - 1.0
    assert last["induction_score"] > max(0.3, 2 * first["induction_score"])


def test_trained_model_has_both_heads_and_peap_finds_the_key_edge(fixture_analysis):
    s = fixture_analysis.summary
    assert s["induction_score"] >= 0.9
    assert s["induction_head"].startswith("a1.") and s["prev_token_head"].startswith("a0.")
    assert s["heads_in_expected_layers"]
    assert s["prev_token_score"] > 0.3 > s["prev_token_score_in_layer1_best"]
    assert s["induction_score_in_layer0_best"] < 0.1
    assert s["loss_repeated_half"] < 0.05 < 2.0 < s["loss_first_half"]
    assert s["peap_smallest_circuit_normalized"] >= 0.8
    assert s["peap_prev_to_key_at_B1"] and s["peap_key_B1_to_A2"] and s["peap_key_edge_in_circuit"]


def test_the_key_edge_check_fails_on_a_circuit_without_it(fixture_analysis):
    from mechscope.circuits.span_circuit import SpanCircuit
    from mechscope.graph import Graph

    model = load(FIXTURE).model
    g = Graph.from_model(model)
    hp, hi = (int(fixture_analysis.summary[k][-1]) for k in ("prev_token_head", "induction_head"))
    assert key_edges(SpanCircuit.full(g, SPANS), g, hp, hi) == {"prev_to_key_at_B1": True, "key_B1_to_A2": True}
    assert key_edges(SpanCircuit.empty(g, SPANS), g, hp, hi) == {"prev_to_key_at_B1": False, "key_B1_to_A2": False}


def test_the_fixture_model_answers_the_task():
    trained = load(FIXTURE)
    data = induction_task(trained.config)
    b = data.batch()
    rows = torch.arange(len(data))
    with torch.no_grad():
        clean = trained.model(b.clean)[rows, b.last]
        cf = trained.model(b.counterfactual)[rows, b.last]
    diff = lambda x: x.gather(1, b.correct)[:, 0] - x.gather(1, b.wrong)[:, 0]  # noqa: E731
    assert (diff(clean) > 2).all() and diff(cf).mean() < -2 and (diff(cf) < 0).float().mean() >= 0.9


def test_save_load_round_trip_and_resume(tmp_path):
    out = tmp_path / "ckpt"
    trained = train(tiny(steps=20), out=out, progress=False)
    back = load(out)
    assert back.config == trained.config and back.state.step == 20
    for k, v in trained.model.state_dict().items():
        assert torch.equal(v, back.model.state_dict()[k]), k
    tokens = repeated_batch(back.config, 4, seed=0).tokens
    assert torch.equal(back.model(tokens), trained.model(tokens))
    straight = train(tiny(steps=30), progress=False)
    resumed = train(tiny(steps=30), out=out, resume=True, progress=False)
    assert resumed.state.step == 30
    for k, v in straight.model.state_dict().items():
        assert torch.allclose(v, resumed.model.state_dict()[k], atol=1e-5), k
    with pytest.raises(ToyError, match="another config"):
        train(tiny(steps=40, lr=0.5), out=out, resume=True, progress=False)
    with pytest.raises(ToyError, match="not 'induction'|no toy.json"):
        load(tmp_path)


@pytest.mark.parametrize("change, field", [
    (dict(max_segment=8), "max_segment"),  # 2 * 8 + 1 > 16
    (dict(min_segment=1), "min_segment"),
    (dict(min_segment=6, max_segment=5), "max_segment"),
    (dict(d_vocab=12), "d_vocab"),
    (dict(loss_on="middle"), "loss_on"),
    (dict(lr=0.0), "lr"),
    (dict(n_heads=0), "n_heads"),
    (dict(steps=-1), "steps"),
])
def test_impossible_configs_name_their_field(change, field):
    with pytest.raises(ToyError, match=field):
        tiny(**change)


def test_overrides_reach_the_config():
    cfg = parse_overrides(InductionConfig, ["n_heads=4", "d_head=16", "loss_on=all"])
    assert (cfg.n_heads, cfg.d_head, cfg.loss_on) == (4, 16, "all")
    assert get_toy("induction").config is InductionConfig


def test_cli_train_then_analyze(tmp_path):
    runner = CliRunner()
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    res = runner.invoke(app, ["toy", "train", "induction", "--out", str(tmp_path / "m"), "--steps", "20", *sets,
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "induction_score" in res.output
    res = runner.invoke(app, ["toy", "analyze", "induction", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "r"),
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    files = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert files == ["analysis.json", "report.html", "toy-induction.png"]
    assert (tmp_path / "r" / "toy-induction.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Induction heads" in (tmp_path / "r" / "report.html").read_text()
    res = runner.invoke(app, ["toy", "train", "induction", "--out", str(tmp_path / "bad"), "--set", "max_segment=99"])
    assert res.exit_code == 2 and "max_segment" in res.output


def test_train_and_analyze_name_their_devices():
    audit = DeviceAudit()
    with audit:
        trained = train(tiny(steps=10), progress=False)
        analyze(trained, progress=False)
    assert not audit.leaks, audit.report()


@pytest.mark.gpu
def test_train_and_analyze_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    trained = train(tiny(steps=300), device="cuda", progress=False)
    assert trained.model.W_E.device.type == "cuda"
    s = analyze(trained, progress=False).summary
    assert s["loss_repeated_half"] < 0.5 * s["loss_first_half"]
    fixture = load(FIXTURE, device="cuda")
    s = analyze(fixture, progress=False).summary
    assert s["induction_score"] >= 0.9 and s["peap_key_edge_in_circuit"]
