"""The report page shell and the viewers' payloads: typed-array columns decode to the numbers they
encode, the circuit payload's member bits give back each circuit, attention patterns equal the model's."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch

import mechscope
from mechscope.attribution import attribute
from mechscope.circuits.edge_table import circuit_edges
from mechscope.circuits.span_circuit import span_greedy
from mechscope.report.page import Section, column, render_page
from mechscope.report.sections.attention_data import attention_payload
from mechscope.report.sections.circuit_data import circuit_payload
from mechscope.tasks import make_task


def decode(col: dict) -> np.ndarray:
    types = {"u8": "<u1", "i8": "<i1", "u16": "<u2", "i16": "<i2", "u32": "<u4", "i32": "<i4", "f32": "<f4", "f64": "<f8"}
    return np.frombuffer(base64.b64decode(col["b64"]), dtype=types[col["dtype"]])


def test_columns_round_trip():
    x = np.array([0.5, -2.25, np.nan, 1e-8])
    back = decode(column(x, "f32"))
    assert np.allclose(back[[0, 1, 3]], x[[0, 1, 3]]) and np.isnan(back[2])
    assert decode(column([-1, 3, 7], "i16")).tolist() == [-1, 3, 7]


def test_page_embeds_strict_json_and_isolates_section_scripts():
    sections = [Section("a", "First", "<p>one</p>", data={"x": float("nan"), "s": "</script>"}, script="let y = 1;"),
                Section("b", "Second", "<p>two</p>")]
    page = render_page("title <x>", "sub", sections, warnings=["careful"])
    assert "title &lt;x&gt;" in page and "warning: careful" in page
    payload = page.split('<script type="application/json" id="data-a">')[1].split("</script>")[0]
    assert json.loads(payload) == {"x": None, "s": "</script>"}
    assert 'id="data-b"' not in page  # no data, no element
    assert page.count("catch (err)") == 1  # one guarded script (section b has none)
    with pytest.raises(ValueError, match="unique"):
        render_page("t", "s", [sections[0], sections[0]])


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    model = mechscope.load_model(str(tiny_model_dirs["llama"]), device="cpu")
    data = make_task("ioi", model.tokenizer, 6, seed=0)
    return model, data


def test_circuit_payload_member_bits_give_each_circuit(llama):
    model, data = llama
    scores = attribute(model, data, "peap", batch_size=6, progress=False)
    circuits = [span_greedy(scores, n) for n in (20, 80, 300)]
    payload = circuit_payload(circuits, scores, info=[{"normalized": 0.5}, {}, {}], saved=1)
    json.dumps(payload, allow_nan=False)
    edges = payload["edges"]
    member, score = decode(edges["member"]), decode(edges["score"])
    parent, child = decode(edges["parent"]), decode(edges["child"])
    assert len(member) == edges["n"] == len(circuit_edges(circuits))
    names = payload["nodes"]["name"]
    for i, c in enumerate(circuits):
        mine = (member >> i) & 1 == 1
        assert mine.sum() == c.n_edges == payload["circuits"][i]["n_edges"]
        want = circuit_edges([c], scores)
        assert sorted(zip((names[p] for p in parent[mine]), (names[q] for q in child[mine]))) == \
            sorted(zip((want.nodes.names[p] for p in want.parent.tolist()), (want.nodes.names[q] for q in want.child.tolist())))
    assert payload["circuits"][1]["saved"] and not payload["circuits"][0]["saved"]
    assert payload["circuits"][0]["normalized"] == 0.5
    finite = np.abs(score[~np.isnan(score)])
    assert np.all(finite[:-1] >= finite[1:])


def test_attention_payload_equals_the_models_patterns(llama):
    model, data = llama
    heads = [(0, 1), (1, 0)]
    payload = attention_payload(model, data, heads, n_examples=2)
    T = payload["T"]
    patterns = decode(payload["patterns"]).reshape(2, 2, len(heads), T, T)
    ex = data.examples[1]
    _, cache = model.run_with_cache(torch.tensor([ex.counterfactual]))
    want = cache["blocks.1.attn.hook_pattern"][0, 0].numpy()
    n = len(ex.counterfactual)
    assert np.abs(patterns[1, 1, 1, :n, :n] / 255 - want).max() <= 0.5 / 255 + 1e-6
    assert payload["heads"] == ["a0.h1", "a1.h0"]
    assert len(payload["examples"][1]["counterfactual"]["tokens"]) == n
    with pytest.raises(mechscope.errors.ParameterError, match="a9.h0"):
        attention_payload(model, data, [(9, 0)])


def test_write_sections_writes_the_page_and_files_at_once(tmp_path):
    from mechscope.errors import ParameterError
    from mechscope.report import ReportError, write_sections

    out = write_sections(tmp_path / "r", "A heatmap", [Section("heat", "Heat", "<p>x</p>", data={"v": [1, 2]})],
                         {"values.json": lambda p: p.write_text("[1, 2]")})
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "values.json"]
    assert 'id="data-heat"' in (out / "report.html").read_text()

    def fails(p):
        p.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_sections(tmp_path / "s", "t", [], {"a.txt": fails})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # nothing half-written left
    with pytest.raises(ParameterError, match="nothing to report"):
        write_sections(tmp_path / "s", "t", [])
    with pytest.raises(ParameterError, match="plain file name"):
        write_sections(tmp_path / "s", "t", [], {"../x": lambda p: None})
    with pytest.raises(ReportError, match="not an empty directory"):
        write_sections(out, "t", [Section("a", "A", "")])


def test_columns_decode_in_the_browser_natively_and_without_native_base64(tmp_path):
    """MS.column gives back the numbers Python encoded, with the browser's own base64 decoder and with
    the page's fallback (for browsers without Uint8Array.fromBase64), for every length modulo 3."""
    from viewer_pages import browser

    rng = np.random.default_rng(0)
    cols = {f"c{n}": rng.standard_normal(n).astype(np.float32) for n in (1, 2, 3, 7, 1000)}
    cols["ints"] = np.array([-3, 0, 5, 127], dtype=np.int8)
    data = {name: column(v, "i8" if v.dtype == np.int8 else "f32") for name, v in cols.items()}
    path = tmp_path / "page.html"
    path.write_text(render_page("columns", "", [Section("cols", "Columns", "", data=data)]), encoding="utf-8")
    with browser() as (context, blocked):
        page = context.new_page()
        page.goto(path.as_uri())
        native = page.evaluate("() => { const d = MS.data('cols'); const o = {};"
                               " for (const k in d) o[k] = Array.from(MS.column(d[k])); return o; }")
        fallback = page.evaluate("() => { delete Uint8Array.fromBase64; Uint8Array.fromBase64 = undefined;"
                                 " const d = MS.data('cols'); const o = {};"
                                 " for (const k in d) o[k] = Array.from(MS.column(d[k])); return o; }")
    assert blocked == []
    for got in (native, fallback):
        for name, want in cols.items():
            assert np.array_equal(np.asarray(got[name], dtype=want.dtype), want), name
