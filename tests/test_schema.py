"""Schema induction (issue 7): built-in tasks and peer prompts for SmolLM2's tokenizer, outliers,
saliency cuts, the LLM backend against a local OpenAI-compatible server, and `mechscope schema`."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mechscope.cli import app
from mechscope.data import PromptPairDataset, make_pair
from mechscope.data.peap_csv import load_peap_csv
from mechscope.schemas.induction import induce_schema, mark_spans, strip_schema
from mechscope.schemas.llm import LLMClient, LLMError, llm_schema
from mechscope.tasks import make_task

PEER = Path(__file__).resolve().parent / "data" / "peap"  # excerpts of the PEAP authors' files; see NOTICE.md there


@pytest.mark.parametrize("task", ["ioi", "greater-than", "winobias"])
def test_induced_schema_is_valid_for_built_in_tasks(smollm2_tokenizer, task):
    data = make_task(task, smollm2_tokenizer, 120, seed=3)
    induced, report = induce_schema(strip_schema(data), smollm2_tokenizer)
    assert report.valid_fraction >= 0.95, report.excluded[:3]
    spans = report.schema.spans
    assert spans[0] == "bos" and spans[-1] == "end" and len(spans) >= 6
    # Every kept example tiles its tokens in schema order, and the last token is the `end` span.
    for ex in induced.examples:
        bounds = ex.span_bounds()
        assert bounds[0][0] == 0 and bounds[-1][1] == len(ex) and bounds[-1][1] - bounds[-1][0] == 1
        assert all(a <= b for a, b in bounds)


def test_induced_ioi_schema_separates_the_names(smollm2_tokenizer):
    data = make_task("ioi", smollm2_tokenizer, 80, seed=1)
    induced, report = induce_schema(strip_schema(data), smollm2_tokenizer)
    assert {"name_1", "and", "name_2"} <= set(report.schema.spans)
    i1, i2 = report.schema.index("name_1"), report.schema.index("name_2")
    for ex, orig in zip(induced.examples, data.examples):
        a1, b1 = ex.span_bounds()[i1]
        h1 = orig.span_bounds()[data.schema.index("name_1")]
        assert (a1, b1) == h1  # the same tokens as the hand-written name_1 span
        a2, b2 = ex.span_bounds()[i2]
        assert (a2, b2) == orig.span_bounds()[data.schema.index("name_2")]


def test_induced_schema_round_trips_through_jsonl(tmp_path, smollm2_tokenizer):
    data = make_task("greater-than", smollm2_tokenizer, 40, seed=0)
    induced, _ = induce_schema(strip_schema(data), smollm2_tokenizer)
    again = PromptPairDataset.load(induced.save(tmp_path / "gt.jsonl"))
    assert again.schema == induced.schema
    assert [ex.span_starts for ex in again.examples] == [ex.span_starts for ex in induced.examples]


@pytest.mark.parametrize("name", ["llama3_winobias_anti_male_second_prof.csv", "llama3_winobias_pro_female_first_prof.csv"])
def test_induction_on_peer_winobias_prompts(smollm2_tokenizer, name):
    data, _ = load_peap_csv(PEER / name, None, smollm2_tokenizer, counterfactual_rule="swap-pronouns")
    induced, report = induce_schema(strip_schema(data), smollm2_tokenizer)
    assert report.valid_fraction >= 0.95 and len(induced) >= 0.95 * len(data)
    assert "end" in report.schema.spans


def test_an_outlier_prompt_is_reported_and_excluded(smollm2_tokenizer):
    data = make_task("greater-than", smollm2_tokenizer, 30, seed=2)
    odd = make_pair(smollm2_tokenizer, [("a", "Completely different words here")], [("a", "Completely other words here")],
                    [" yes"], [" no"])
    mixed = strip_schema(data)._with(strip_schema(data).examples[:15] + [odd] + strip_schema(data).examples[15:])
    induced, report = induce_schema(mixed, smollm2_tokenizer)
    assert [i for i, _ in report.excluded] == [15]
    assert "shared tokens" in report.excluded[0][1]
    assert len(induced) == 30 and report.valid_fraction == pytest.approx(30 / 31)


def test_saliency_cuts_give_salient_tokens_their_own_span(smollm2_tokenizer):
    """A slot whose most salient token is always its last one is cut there."""
    data = make_task("winobias", smollm2_tokenizer, 40, seed=0)
    stripped = strip_schema(data)
    plain, plain_report = induce_schema(stripped, smollm2_tokenizer)
    import torch

    # Synthetic saliency: the last token of every prompt's first slot stands out.
    slot = next(i for i, n in enumerate(plain_report.schema.spans) if n.startswith("text"))
    saliency = []
    for ex in plain.examples:
        s = torch.full((len(ex),), 0.01)
        a, b = ex.span_bounds()[slot]
        s[b - 1] = 5.0
        saliency.append(s)
    cut, cut_report = induce_schema(plain, smollm2_tokenizer, saliency)
    assert len(cut_report.schema) == len(plain_report.schema) + 1
    for ex_plain, ex_cut in zip(plain.examples, cut.examples):
        a, b = ex_plain.span_bounds()[slot]
        assert ex_cut.span_bounds()[slot + 1] == (b - 1, b)


def test_mark_spans(smollm2_tokenizer):
    data = make_task("ioi", smollm2_tokenizer, 2, seed=0)
    text = mark_spans(data.examples[0], data.schema, smollm2_tokenizer)
    assert text.startswith("[bos:") and "[name_1:" in text and text.endswith("to]")


# ------------------------------------------------------------------------------------------------
# LLM backend against a local OpenAI-compatible server
# ------------------------------------------------------------------------------------------------


class FakeChat(BaseHTTPRequestHandler):
    """Answers chat completions the way an instruction-following model would for IOI prompts: a
    regular-expression segmentation. One prompt (id 3) gets a wrong segmentation on purpose."""

    requests: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeChat.requests.append((self.path, self.headers.get("Authorization"), body))
        request = json.loads(body["messages"][-1]["content"])
        if request["task"] == "propose_schema":
            answer = {"spans": ["intro", "name_1", "and", "name_2", "rest", "end"]}
        else:
            out = []
            for p in request["prompts"]:
                m = re.match(r"^(.*?)( [A-Z]\w+)( and)( [A-Z]\w+)(.*)( to)$", p["text"])
                segments = [[n, t] for n, t in zip(["intro", "name_1", "and", "name_2", "rest", "end"], m.groups())]
                if p["id"] == 3:
                    segments[-1][1] = " from"
                out.append({"id": p["id"], "segments": segments})
            answer = {"assignments": out}
        content = "Here is the JSON:\n```json\n" + json.dumps(answer) + "\n```"
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture()
def fake_llm():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeChat)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeChat.requests = []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_llm_backend_assigns_spans_and_checks_them(fake_llm, smollm2_tokenizer, monkeypatch):
    data = make_task("ioi", smollm2_tokenizer, 12, seed=0, templates="ABBA")
    monkeypatch.setenv("MECHSCOPE_LLM_BASE_URL", fake_llm)
    monkeypatch.setenv("MECHSCOPE_LLM_API_KEY", "secret")
    client = LLMClient.from_env()
    induced, report = llm_schema(strip_schema(data), smollm2_tokenizer, None, client, chunk=5)
    assert report.schema.spans == ("bos", "intro", "name_1", "and", "name_2", "rest", "end")
    assert [i for i, _ in report.excluded] == [3] and "do not rebuild the prompt" in report.excluded[0][1]
    assert report.valid_fraction == pytest.approx(11 / 12)
    hand = [ex for i, ex in enumerate(data.examples) if i != 3]
    for ex, orig in zip(induced.examples, hand):
        assert ex.span_bounds()[2] == orig.span_bounds()[data.schema.index("name_1")]
    paths = {(path, auth) for path, auth, _ in FakeChat.requests}
    assert paths == {("/v1/chat/completions", "Bearer secret")}
    assert len(FakeChat.requests) == 1 + 3  # the proposal, then 12 prompts in chunks of 5


def test_llm_backend_errors_are_clear(fake_llm, smollm2_tokenizer, monkeypatch):
    monkeypatch.delenv("MECHSCOPE_LLM_BASE_URL", raising=False)
    with pytest.raises(LLMError, match="MECHSCOPE_LLM_BASE_URL"):
        LLMClient.from_env()
    data = make_task("ioi", smollm2_tokenizer, 2, seed=0)
    with pytest.raises(LLMError, match="request failed"):
        llm_schema(data, smollm2_tokenizer, None, LLMClient("http://127.0.0.1:9/v1", timeout=2))
    from mechscope.schemas.llm import parse_json_answer

    with pytest.raises(LLMError, match="no JSON object"):
        parse_json_answer("I cannot help with that.")


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def test_schema_cli(tmp_path, tiny_model_dirs):
    runner = CliRunner()
    model = str(tiny_model_dirs["llama"])
    src, out = tmp_path / "ioi.jsonl", tmp_path / "ioi_schema.jsonl"
    assert runner.invoke(app, ["data", "ioi", "--model", model, "--n", "16", "--out", str(src)]).exit_code == 0
    result = runner.invoke(app, ["schema", str(src), "--model", model, "--out", str(out)])
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert re.fullmatch(r"valid_fraction=\d\.\d{4}", last) and float(last.split("=")[1]) >= 0.95
    assert "schema (" in result.output and "[bos:" in result.output
    assert len(PromptPairDataset.load(out)) >= 15
    bad = runner.invoke(app, ["schema", str(src), "--model", model, "--out", str(tmp_path / "x.jsonl"),
                              "--method", "oracle"])
    assert bad.exit_code == 2 and "unknown method" in bad.output and not (tmp_path / "x.jsonl").exists()
