"""Datasets streamed from disk (data/streaming.py) give the in-memory results; a bad row mid-file is
named by line and leaves no output; memory stays flat as the file grows; `device_map` loads run the
same attribution as a plain load."""

from __future__ import annotations

import json
import os
import tracemalloc

import pytest
import tiny
import torch
from typer.testing import CliRunner

import mechscope
from mechscope.attribution import attribute
from mechscope.circuits.evaluation import evaluate, faithfulness_curve, select_circuits
from mechscope.cli import app
from mechscope.data import load_text_jsonl
from mechscope.data.dataset import DatasetError, PromptPairDataset
from mechscope.data.streaming import StreamingDataset, load_jsonl, stream_jsonl
from mechscope.errors import MechscopeError

from test_byo import CAPITALS, capital_rows, write_jsonl

runner = CliRunner()


@pytest.fixture(scope="module")
def capitals_dir(tmp_path_factory):
    lines = tuple(f"The capital of {c} is {k}." for c, k in CAPITALS.items()) * 20
    tok = tiny.build_tokenizer(800, lines)
    return str(tiny.save_model_dir(tmp_path_factory.mktemp("stream") / "llama", "llama", tok, seed=3))


@pytest.fixture(scope="module")
def capitals_model(capitals_dir):
    return mechscope.load_model(capitals_dir, device="cpu")


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-6) -> bool:
    a, b = a.double(), b.double()
    return bool(((a - b).abs() <= rel * b.abs().max().clamp(min=1e-30)).all())


@pytest.mark.parametrize("method,aggregation", [("eap", "sum"), ("eap-ig", "sum"), ("peap", "sum"), ("peap", "avg")])
def test_streamed_attribution_equals_in_memory(tmp_path, capitals_model, method, aggregation):
    path = write_jsonl(tmp_path / "capitals.jsonl", capital_rows(spans=True))
    memory = load_text_jsonl(path, capitals_model.tokenizer)
    streamed = stream_jsonl(path, capitals_model.tokenizer)
    assert isinstance(streamed, StreamingDataset) and len(streamed) == len(memory) == 56
    assert streamed.schema == memory.schema and streamed.tokenizer == memory.tokenizer
    kw = dict(batch_size=6, progress=False, steps=2, aggregation=aggregation)  # 56 = 9 x 6 + 2: a short last batch
    a = attribute(capitals_model, memory, method, **kw)
    b = attribute(capitals_model, streamed, method, **kw)
    assert b.n_examples == 56 and b.spans == a.spans
    assert close(b.values, a.values)
    assert set(b.crossing) == set(a.crossing)
    for kind in a.crossing:
        assert close(b.crossing[kind], a.crossing[kind])
    for kind in a.concrete:
        assert close(b.concrete[kind], a.concrete[kind])


def test_streamed_tokenized_dataset_and_evaluation(tmp_path, capitals_model):
    memory = load_text_jsonl(write_jsonl(tmp_path / "capitals.jsonl", capital_rows(spans=True)),
                             capitals_model.tokenizer)
    saved = memory.save(tmp_path / "tokenized.jsonl")
    streamed = stream_jsonl(saved)  # a tokenized dataset needs no tokenizer
    assert streamed.format == "dataset" and len(streamed) == len(memory)
    assert [ex.clean for ex in streamed.examples] == [ex.clean for ex in memory.examples]
    scores = attribute(capitals_model, memory, "peap", batch_size=8, progress=False)
    circuit = select_circuits(scores, [0.05])[0]
    f_mem = evaluate(capitals_model, circuit, memory, batch_size=8, progress=False)
    f_str = evaluate(capitals_model, circuit, streamed, batch_size=8, progress=False)
    for key in ("soft", "hard", "normalized", "metric_circuit", "metric_model", "metric_empty", "concrete_edges",
                "gap_se"):
        assert getattr(f_str, key) == pytest.approx(getattr(f_mem, key), rel=1e-6, abs=1e-12), key
    eap = attribute(capitals_model, memory, "eap", batch_size=8, progress=False)
    c_mem = faithfulness_curve(capitals_model, eap, memory, fractions=(0.1, 0.5, 1.0), batch_size=8, progress=False)
    c_str = faithfulness_curve(capitals_model, eap, streamed, fractions=(0.1, 0.5, 1.0), batch_size=8, progress=False)
    assert [p.normalized for p in c_str.points] == pytest.approx([p.normalized for p in c_mem.points], rel=1e-6)
    assert c_str.cpr == pytest.approx(c_mem.cpr, rel=1e-6)
    # Streamed, saved again: the same file content as the in-memory save.
    streamed.save(tmp_path / "again.jsonl")
    assert (tmp_path / "again.jsonl").read_text() == saved.read_text()


def test_bad_row_mid_file_is_named_and_nothing_is_written(tmp_path, capitals_model, capitals_dir):
    rows = capital_rows(spans=True)
    rows[30] = {**rows[30], "correct": " Paris Madrid Rome"}  # several tokens: not a single-token answer
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    streamed = stream_jsonl(path, capitals_model.tokenizer)  # opening reads only the first row
    with pytest.raises(DatasetError, match=r"bad\.jsonl, line 31: .*correct"):
        attribute(capitals_model, streamed, "eap", batch_size=4, progress=False)
    # The CLI: a one-line error naming the line, exit 2, and no scores file.
    out = tmp_path / "scores.safetensors"
    result = runner.invoke(app, ["attribute", "--data", path, "--stream", "--model", capitals_dir, "--device", "cpu",
                                 "--batch-size", "4", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "line 31" in result.output and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name not in ("bad.jsonl",)]
    # Broken JSON mid-file.
    lines = (tmp_path / "bad.jsonl").read_text().splitlines()
    lines[30] = lines[30][:-5]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"line 31: not valid JSON"):
        attribute(capitals_model, stream_jsonl(path, capitals_model.tokenizer), "eap", progress=False)


def test_cli_attribute_streamed_equals_in_memory(tmp_path, capitals_model, capitals_dir):
    path = write_jsonl(tmp_path / "capitals.jsonl", capital_rows(spans=True))
    outs = {}
    for flag in ("--stream", "--no-stream"):
        outs[flag] = tmp_path / f"scores{flag}.safetensors"
        result = runner.invoke(app, ["attribute", "--data", path, flag, "--model", capitals_dir, "--device", "cpu",
                                     "--method", "peap", "--batch-size", "8", "--out", str(outs[flag])])
        assert result.exit_code == 0, result.output
        assert ("(streamed)" in result.output) == (flag == "--stream")
    a = mechscope.EdgeScores.load(outs["--no-stream"])
    b = mechscope.EdgeScores.load(outs["--stream"])
    assert a.n_examples == b.n_examples == 56 and close(b.values, a.values)
    for kind in a.crossing:
        assert close(b.crossing[kind], a.crossing[kind])


def test_random_access_and_changed_file(tmp_path, capitals_model):
    path = write_jsonl(tmp_path / "capitals.jsonl", capital_rows(spans=False))
    streamed = stream_jsonl(path, capitals_model.tokenizer, limit=10)
    assert len(streamed) == 10 and len(list(streamed.examples)) == 10
    with pytest.raises(DatasetError, match="materialize"):
        streamed.split(0.5)
    with pytest.raises(DatasetError, match="example 3"):
        streamed.examples[3]  # outside a batch
    assert isinstance(streamed.materialize(), PromptPairDataset) and len(streamed.materialize()) == 10
    with pytest.raises(DatasetError, match="67 examples asked for, the file has 56"):
        stream_jsonl(path, capitals_model.tokenizer, limit=67)
    with pytest.raises(DatasetError, match="give the model's tokenizer"):
        stream_jsonl(path)
    # load_jsonl: streamed on request (or above STREAM_ABOVE bytes), else in memory.
    assert isinstance(load_jsonl(path, capitals_model.tokenizer, stream=True), StreamingDataset)
    assert isinstance(load_jsonl(path, capitals_model.tokenizer), PromptPairDataset)
    with open(path, "a") as f:
        f.write(json.dumps(capital_rows(spans=False)[0]) + "\n")
    os.utime(path, ns=(1, 1))
    with pytest.raises(DatasetError, match="changed"):
        next(iter(streamed.batches(4)))


def test_mismatched_spans_mid_file(tmp_path, capitals_model):
    rows = capital_rows(spans=True)
    rows[20] = capital_rows(spans=False)[20]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DatasetError, match=r"mixed\.jsonl, line 21: field 'clean': span names"):
        attribute(capitals_model, stream_jsonl(path, capitals_model.tokenizer), "eap", progress=False)


def _peak_python_bytes(path, tokenizer) -> int:
    tracemalloc.start()
    try:
        ds = stream_jsonl(path, tokenizer)
        for _, batch in ds.batches(8):
            assert batch.clean.shape[0] <= 8
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_streaming_memory_stays_flat(tmp_path, capitals_model):
    """The peak of Python allocations over a full pass does not grow with the file (it would 10x if
    the rows or examples were kept)."""
    rows = capital_rows(spans=True)
    small = write_jsonl(tmp_path / "small.jsonl", rows * 4)  # 224 rows
    large = write_jsonl(tmp_path / "large.jsonl", rows * 40)  # 2240 rows
    _peak_python_bytes(small, capitals_model.tokenizer)  # warm caches
    p_small = _peak_python_bytes(small, capitals_model.tokenizer)
    p_large = _peak_python_bytes(large, capitals_model.tokenizer)
    assert p_large < 1.3 * p_small, (p_small, p_large)
    # ... whereas reading into memory grows with it.
    tracemalloc.start()
    load_text_jsonl(large, capitals_model.tokenizer)
    p_memory = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert p_memory > 3 * p_large


def test_device_map_load_attributes_like_a_plain_load(tmp_path, capitals_model, capitals_dir):
    mapped = mechscope.load_model(capitals_dir, device_map="auto")
    assert str(mechscope.devices.model_device(mapped)) == str(mechscope.devices.model_device(capitals_model))
    path = write_jsonl(tmp_path / "capitals.jsonl", capital_rows(spans=True))
    data = stream_jsonl(path, mapped.tokenizer)
    for method in ("eap", "peap"):
        a = attribute(capitals_model, data, method, batch_size=8, progress=False)
        b = attribute(mapped, data, method, batch_size=8, progress=False)
        assert b.values.device.type == "cpu" and close(b.values, a.values)
        for kind in a.crossing:
            assert close(b.crossing[kind], a.crossing[kind])
    with pytest.raises(MechscopeError, match="either device or device_map"):
        mechscope.load_model(capitals_dir, device="cpu", device_map="auto")
    with pytest.raises(MechscopeError, match="unknown device_map 'everywhere'"):
        mechscope.load_model(capitals_dir, device_map="everywhere")
    out = tmp_path / "scores.safetensors"
    result = runner.invoke(app, ["attribute", "--data", path, "--model", capitals_dir, "--device-map", "auto",
                                 "--batch-size", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert close(mechscope.EdgeScores.load(out).values, attribute(capitals_model, data, "eap", batch_size=8,
                                                                  progress=False).values)
    result = runner.invoke(app, ["attribute", "--data", path, "--model", capitals_dir, "--device-map", "auto",
                                 "--device", "cpu", "--out", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 2 and "not both" in result.output


@pytest.mark.gpu
def test_device_map_on_gpu(tmp_path, capitals_model, capitals_dir):
    """On a GPU machine: device_map="auto" puts the layers on the GPU(s); scores come back to the host
    and equal the CPU run."""
    mapped = mechscope.load_model(capitals_dir, device_map="auto")
    assert mechscope.devices.model_device(mapped).type == "cuda"
    path = write_jsonl(tmp_path / "capitals.jsonl", capital_rows(spans=True))
    data = stream_jsonl(path, mapped.tokenizer)
    a = attribute(capitals_model, data, "peap", batch_size=8, progress=False)
    b = attribute(mapped, data, "peap", batch_size=8, progress=False)
    assert b.values.device.type == "cpu"
    assert torch.allclose(b.values, a.values, rtol=1e-3, atol=1e-5)


def test_training_text_jsonl_is_read_only_as_far_as_needed(tmp_path, capitals_model):
    """Activation buffers' text (`training_tokens` -> lens.text.load_text): a .jsonl is read line by line
    as it is tokenized; with a count, a broken line far into the file is never reached."""
    from mechscope.dictionaries.activations import training_tokens
    from mechscope.lens.text import TextError, read_text

    docs = [f"The capital of {c} is {k}." for c, k in CAPITALS.items()] * 50
    lines = [json.dumps({"text": d}) for d in docs] + ['{"text": broken']
    path = tmp_path / "text.jsonl"
    path.write_text("\n".join(lines) + "\n")
    tokens = training_tokens(capitals_model, str(path), length=16, count=4, progress=False)
    assert tokens.shape == (4, 16)
    assert torch.equal(tokens, mechscope.lens.text.tokenize_text(docs, capitals_model.tokenizer, 16, 4))
    with pytest.raises(TextError, match=rf"line {len(docs) + 1}: not valid JSON"):
        training_tokens(capitals_model, str(path), length=16, progress=False)
    with pytest.raises(TextError, match=rf"line {len(docs) + 1}"):
        read_text(path)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(TextError, match="holds no text"):
        training_tokens(capitals_model, str(tmp_path / "blank.jsonl"), length=16, progress=False)
