"""Path patching (docs/method.md §9) against the method written out step by step with plain hooks, its
identities, component names, and the `patch path` command."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from mechscope.errors import ParameterError
from mechscope.graph import Graph
from mechscope.metrics import final_logits, logit_diff
from mechscope.patching.names import Node, parse_receiver, parse_receivers, parse_sender, parse_senders
from mechscope.patching.path import PathPatchingResult, path_patch, path_patch_sets, path_patch_sweep
from mechscope.tasks import make_task


@pytest.fixture(scope="module")
def data(tiny_model):
    return make_task("ioi", tiny_model.tokenizer, 6, seed=3)


# ---------------------------------------------------------------------------------------------------
# The method with plain hooks: clean and reference caches, the frozen run, the receivers' run.
# ---------------------------------------------------------------------------------------------------


def _cache(model, tokens, mask):
    """z per layer, MLP outputs and the embedding on `tokens`."""
    cache = {}
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.{h}" for l in range(model.cfg.n_layers)
                                            for h in ("attn.hook_z", "hook_mlp_out")]

    def keep(name):
        def hook(value, hook=None):
            cache[name] = value.detach().clone()
            return value
        return hook

    with model.hooks(fwd_hooks=[(n, keep(n)) for n in names]):
        model(tokens, attention_mask=mask)
    return cache


def _receiver_hook_name(r: Node) -> str:
    return {"q": f"blocks.{r.layer}.hook_q_input", "k": f"blocks.{r.layer}.hook_k_input",
            "v": f"blocks.{r.layer}.hook_v_input", "mlp_in": f"blocks.{r.layer}.hook_mlp_in",
            "logits": "ln_final.hook_in"}[r.kind]


@torch.no_grad()
def naive_path_patch(model, batch, senders: list[Node], receivers: list[Node], ablation="counterfactual"):
    """Metric per example after patching senders -> receivers, as Wang et al. describe it."""
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    model._mechscope_split_inputs = True
    clean = _cache(model, batch.clean, batch.attention_mask)
    ref = _cache(model, batch.counterfactual, batch.attention_mask)
    if ablation == "zero":
        ref = {k: torch.zeros_like(v) for k, v in ref.items()}
    # Step 2: clean prompt; senders from the reference; every other head and MLP frozen at clean.
    frozen = []
    for l in range(model.cfg.n_layers):
        heads = [s.head for s in senders if s.kind == "head" and s.layer == l]

        def z_hook(value, hook=None, l=l, heads=heads):
            z = clean[f"blocks.{l}.attn.hook_z"].clone()
            for h in heads:
                z[:, :, h] = ref[f"blocks.{l}.attn.hook_z"][:, :, h]
            return z

        src = ref if Node("mlp", l) in senders else clean
        frozen += [(f"blocks.{l}.attn.hook_z", z_hook),
                   (f"blocks.{l}.hook_mlp_out", lambda v, hook=None, x=src[f"blocks.{l}.hook_mlp_out"]: x.clone())]
    if Node("embed") in senders:
        frozen.append(("blocks.0.hook_resid_pre", lambda v, hook=None: ref["blocks.0.hook_resid_pre"].clone()))
    recorded = {}

    def record(r):
        def hook(value, hook=None):
            recorded[r] = (value[:, :, r.head] if value.dim() == 4 else value).detach().clone()
            return value
        return hook

    with model.hooks(fwd_hooks=frozen + [(_receiver_hook_name(r), record(r)) for r in receivers]):
        model(batch.clean, attention_mask=batch.attention_mask)

    # Step 3: clean prompt with only the receivers' inputs replaced.
    def put(r):
        def hook(value, hook=None):
            value = value.clone()
            if value.dim() == 4:
                value[:, :, r.head] = recorded[r]
                return value
            return recorded[r].clone()
        return hook

    with model.hooks(fwd_hooks=[(_receiver_hook_name(r), put(r)) for r in receivers]):
        logits = model(batch.clean, attention_mask=batch.attention_mask)
    return logit_diff(final_logits(logits, batch.last), batch)


def _metric(model, batch, hooks=()):
    with model.hooks(fwd_hooks=list(hooks)):
        logits = model(batch.clean, attention_mask=batch.attention_mask)
    return logit_diff(final_logits(logits, batch.last), batch)


def _pairs(graph: Graph):
    kv = "g" if graph.n_kv_heads != graph.n_heads else "h"
    return [
        (["a0.h1"], ["a1.h2.q"]),
        (["a0.h0", "m0"], [f"a1.{kv}1.k"]),
        (["embed"], [f"a1.{kv}0.v"]),
        (["a0.h3"], ["m0.in"]),
        (["a1.h0", "a0.h2"], ["logits"]),
        (["a0.h1", "m0"], ["a1.h0.q", f"a1.{kv}1.v", "m1.in", "logits"]),
    ]


def test_path_patching_equals_the_method_step_by_step(tiny_model, data):
    """For each (senders, receivers) pair, the library's value of M after path patching equals the
    three runs of the method (clean; senders from x' with everything else frozen, receivers recorded;
    clean with the receivers' inputs replaced), per example, within 1e-5 of the logit difference."""
    graph = Graph.from_model(tiny_model)
    batch = data.batch()
    for senders, receivers in _pairs(graph):
        result = path_patch_sets(tiny_model, data, [senders], receivers, progress=False)
        expected = naive_path_patch(tiny_model, batch, parse_senders(senders, graph), parse_receivers(receivers, graph))
        assert torch.allclose(result.metric_patched[0], expected, atol=1e-5, rtol=1e-5), (senders, receivers)
        # A real effect, not a comparison of two clean runs.
        assert not torch.allclose(expected, result.metric_clean, atol=1e-4), (senders, receivers)


def test_zero_ablation_equals_the_method(tiny_model, data):
    """Zero reference: senders write nothing (a head's z is zero; the layer's b_O is not the head's)."""
    graph = Graph.from_model(tiny_model)
    senders, receivers = ["a0.h2", "m0"], ["a1.h1.q", "logits"]
    result = path_patch_sets(tiny_model, data, [senders], receivers, ablation="zero", progress=False)
    expected = naive_path_patch(tiny_model, data.batch(), parse_senders(senders, graph),
                                parse_receivers(receivers, graph), ablation="zero")
    assert torch.allclose(result.metric_patched[0], expected, atol=1e-5, rtol=1e-5)


def test_no_senders_is_the_clean_run(tiny_model, data):
    """Identity: with S = ∅ nothing changes: M_patched = M(x) for every example, effect 0."""
    result = path_patch_sets(tiny_model, data, [[]], ["a1.h0.q", "logits"], progress=False)
    assert torch.allclose(result.metric_patched[0], result.metric_clean, atol=1e-5)
    assert abs(float(result.effect[0])) < 1e-5


def test_every_later_node_to_the_logits_is_activation_patching(tiny_model, data):
    """Identity: with S = every node from some point on (closed under "comes later") and R = logits,
    path patching equals activation patching of S (noising the outputs of every node of S at once,
    directly, on the clean prompt). Nothing after S is left to recompute, so only direct paths exist.
    With S = every node, both are the counterfactual run (effect 1)."""
    batch = data.batch()
    clean, cf = _cache(tiny_model, batch.clean, batch.attention_mask), _cache(tiny_model, batch.counterfactual,
                                                                                batch.attention_mask)
    patched = _metric(tiny_model, batch, [
        ("blocks.0.hook_mlp_out", lambda v, hook=None: cf["blocks.0.hook_mlp_out"]),
        ("blocks.1.attn.hook_z", lambda v, hook=None: cf["blocks.1.attn.hook_z"]),
        ("blocks.1.hook_mlp_out", lambda v, hook=None: cf["blocks.1.hook_mlp_out"]),
    ])
    result = path_patch_sets(tiny_model, data, [["m0", "a1", "m1"], ["embed", "a0", "m0", "a1", "m1"]], "logits",
                             progress=False)
    assert torch.allclose(result.metric_patched[0], patched, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(patched, result.metric_clean, atol=1e-3)
    assert torch.allclose(result.metric_patched[1], result.metric_counterfactual, atol=1e-4, rtol=1e-4)
    assert abs(float(result.effect[1]) - 1.0) < 1e-3
    del clean


def test_one_head_to_the_logits_is_its_direct_effect(tiny_model, data):
    """Identity: a single sender head with R = logits gives the head's direct effect: the clean final
    residual plus (its counterfactual write - its clean write), (z'_h - z_h) @ W_O[h], through the final
    norm and unembedding."""
    batch = data.batch()
    clean, cf = _cache(tiny_model, batch.clean, batch.attention_mask), _cache(tiny_model, batch.counterfactual,
                                                                                batch.attention_mask)
    layer, head = 0, 2
    dz = cf[f"blocks.{layer}.attn.hook_z"][:, :, head] - clean[f"blocks.{layer}.attn.hook_z"][:, :, head]
    write = dz @ tiny_model.W_O[layer, head].detach()
    direct = _metric(tiny_model, batch, [("ln_final.hook_in", lambda v, hook=None: v + write)])
    result = path_patch_sets(tiny_model, data, [[f"a{layer}.h{head}"]], ["logits"], progress=False)
    assert torch.allclose(result.metric_patched[0], direct, atol=1e-5, rtol=1e-5)


def test_sweep_is_each_head_alone(tiny_model, data, tmp_path):
    """The sweep's [layer, head] map holds, at each head, path_patch with that head as the only sender;
    it round-trips through its file."""
    graph = Graph.from_model(tiny_model)
    sweep = path_patch_sweep(tiny_model, data, ["a1.h1.q"], progress=False)
    assert sweep.grid.shape == (graph.n_layers, graph.n_heads)
    assert torch.allclose(sweep.grid[0, 3], torch.tensor(path_patch(tiny_model, data, ["a0.h3"], ["a1.h1.q"],
                                                                    progress=False)), atol=1e-5)
    # Heads of layer 1 do not write before a1.h1's query reads: no path, the clean metric.
    later = sweep.metric_patched[graph.n_heads:]
    assert torch.allclose(later, sweep.metric_clean.expand_as(later), atol=1e-5)
    loaded = PathPatchingResult.load(sweep.save(tmp_path / "r.safetensors"))
    assert torch.equal(loaded.grid, sweep.grid) and loaded.sender_sets == sweep.sender_sets
    mlps = path_patch_sweep(tiny_model, data, "logits", sender_kind="mlps", progress=False)
    assert mlps.grid.shape == (graph.n_layers,)


def test_mean_ablation_runs_and_differs(tiny_model, data):
    zero = path_patch(tiny_model, data, "a0.h1,m0", "logits", ablation="zero", progress=False)
    mean = path_patch(tiny_model, data, "a0.h1,m0", "logits", ablation="mean", progress=False)
    assert zero != mean


# ---------------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------------


def test_names_parse_in_every_form():
    g = Graph(n_layers=12, n_heads=12, n_kv_heads=12)
    for text in ("blocks.9.attn.hook_z[head 6]", "blocks.9.attn.hook_z[6]", "a9.h6"):
        assert parse_sender(text, g) == [Node("head", 9, 6)]
        assert parse_sender(text, g)[0].name == "a9.h6"
    assert parse_sender("m9", g) == parse_sender("blocks.9.hook_mlp_out", g) == [Node("mlp", 9)]
    assert parse_sender("embed", g) == parse_sender("input", g) == [Node("embed")]
    assert len(parse_sender("a9", g)) == 12
    assert parse_receiver("a9.h6.q", g).name == "a9.h6.q"
    assert parse_receiver("a9.h6.k", g).name == "a9.g6.k"  # without grouped-query attention, one head
    assert parse_receiver("m9.in", g) == parse_receiver("blocks.9.hook_mlp_in", g) == Node("mlp_in", 9)
    assert parse_receiver("logits", g) == Node("logits")
    assert parse_senders("a9.h6, m9,a9.h6", g) == [Node("head", 9, 6), Node("mlp", 9)]
    # Every node name of the graph parses back to itself.
    for name in g.upstream_names:
        assert [n.name for n in parse_sender(name, g)] == [name]
    for name in g.downstream_names:
        assert parse_receiver(name, g).name == name


@pytest.mark.parametrize("text, kind, message", [
    ("a12.h0", "sender", "layer 12 is out of range; the model has layers 0-11"),
    ("a3.h12", "sender", "head 12 is out of range; each layer has heads 0-11"),
    ("attn9", "sender", "unknown sender 'attn9'; senders are embed, a<L>.h<H>"),
    ("a9.h6.q", "sender", "(layers 0-11, heads 0-11, key-value groups 0-3)"),
    ("a9.h6", "receiver", "unknown receiver 'a9.h6'; receivers are a<L>.h<H>.q|k|v"),
    ("a9.h6.k", "receiver", "name the group: a9.g2.k (heads 6-8)"),
    ("a9.g4.v", "receiver", "key-value group 4 is out of range; each layer has key-value groups 0-3"),
    ("a9.g1.q", "receiver", "a query input belongs to a head"),
    ("m12.in", "receiver", "layer 12 is out of range"),
])
def test_names_refuse_with_one_line(text, kind, message):
    g = Graph(n_layers=12, n_heads=12, n_kv_heads=4)
    with pytest.raises(ParameterError) as e:
        (parse_sender if kind == "sender" else parse_receiver)(text, g)
    assert message in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------
# CLI (on a local `patch` app until mechscope.cli adds its own)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def patch_cli():
    """The real `mechscope` app: `patch path` and `patch dla` are registered on its `patch` sub-app."""
    from mechscope.cli import app

    return app


def test_cli_path_sweep_and_dla(patch_cli, tiny_model_dirs, tmp_path):
    runner = CliRunner()
    llama = str(tiny_model_dirs["llama"])
    out = tmp_path / "sweep"
    r = runner.invoke(patch_cli, ["patch", "path", "--task", "ioi", "--model", llama, "--n", "4", "--sweep", "heads",
                                  "--receivers", "logits", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["path_patching.png", "path_patching.safetensors", "report.html"]
    assert PathPatchingResult.load(out / "path_patching.safetensors").grid.shape == (2, 4)
    out2 = tmp_path / "set"
    r = runner.invoke(patch_cli, ["patch", "path", "--task", "ioi", "--model", llama, "--n", "4", "--senders",
                                  "a0.h1,m0", "--receivers", "a1.h0.q,logits", "--out", str(out2)])
    assert r.exit_code == 0, r.output
    out3 = tmp_path / "dla"
    r = runner.invoke(patch_cli, ["patch", "dla", "--task", "ioi", "--model", llama, "--n", "4", "--out", str(out3)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out3.iterdir()) == ["dla.png", "dla.safetensors", "report.html"]
    assert "Direct logit attribution" in (out3 / "report.html").read_text()


@pytest.mark.parametrize("args, message", [
    (["--senders", "a0.h9x"], "unknown sender 'a0.h9x'"),
    (["--senders", "a0.h1", "--receivers", "a0.h1"], "unknown receiver 'a0.h1'"),
    (["--senders", "a5.h1"], "layer 5 is out of range; the model has layers 0-1"),
    (["--senders", "a0.h1", "--receivers", "a1.h1.k"], "name the group: a1.g0.k (heads 0-1)"),
    (["--senders", "a0.h1", "--sweep", "heads"], "give either --senders or --sweep"),
    (["--sweep", "layers"], "unknown sweep 'layers'"),
    (["--senders", "a0.h1", "--ablation", "resample"], "unknown ablation 'resample'"),
])
def test_cli_path_refuses_bad_names_in_one_line(patch_cli, tiny_model_dirs, tmp_path, args, message):
    out = tmp_path / "out"
    r = CliRunner().invoke(patch_cli, ["patch", "path", "--task", "ioi", "--model", str(tiny_model_dirs["llama"]),
                                       "--n", "4", "--out", str(out), *args])
    assert r.exit_code == 2, r.output
    # Names' forms are refused before the model loads; layers and heads out of range once it has
    # loaded (its weight-loading progress may come first), before any forward pass.
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.output
    if "range" not in message and "group" not in message:
        assert "Loading weights" not in r.output
    assert not out.exists() and list(tmp_path.iterdir()) == []
