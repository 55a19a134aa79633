"""Concept sets: the built-in sets for the tiny and the SmolLM2 tokenizer, the pair-keeping split, the
behaviour metric against a hand computation, and the JSONL loader's errors."""

from __future__ import annotations

import json

import pytest
import torch

import mechscope
import tiny
from mechscope.probes.concepts import CONCEPTS, Behaviour, ConceptError, ConceptSet, load_concept, make_concept

ANSWERS = ("great good wonderful bad terrible awful are were have is was has true correct false wrong " * 3,)


def _check_set(s: ConceptSet, n: int):
    assert len(s) == n and sum(s.labels) == n // 2
    assert len(s.pairs) == n // 2 and len(set(s.texts)) == n  # no text twice
    for a, b in s.pairs:
        assert s.labels[a] == 1 and s.labels[b] == 0 and s.texts[a] != s.texts[b]
        assert s.word_types[a] in s.texts[a].replace(">", " is ") or s.name == "truth"
    assert len(set(s.word_types)) >= 10  # enough types for a control task


@pytest.mark.parametrize("name", CONCEPTS)
def test_built_in_sets_for_the_tiny_tokenizer(name, tiny_tokenizer):
    with pytest.warns(mechscope.errors.MechscopeWarning, match="no behaviour metric"):
        s = make_concept(name, tiny_tokenizer, n=200)  # this tokenizer has none of the answer words as one token
    _check_set(s, 200)
    assert s.behaviour is None
    with_words = tiny.build_tokenizer(extra_lines=ANSWERS)
    s = make_concept(name, with_words, n=100, seed=3)
    _check_set(s, 100)
    b = s.behaviour
    for word, i in zip(b.positive_words + b.negative_words, b.positive_ids + b.negative_ids):
        assert with_words(word, add_special_tokens=False)["input_ids"] == [i]


@pytest.mark.parametrize("name", CONCEPTS)
def test_built_in_sets_for_the_smollm2_tokenizer(name, smollm2_tokenizer):
    s = make_concept(name, smollm2_tokenizer, n=200)
    _check_set(s, 200)
    b = s.behaviour
    assert len(b.positive_ids) >= 3 and len(b.negative_ids) >= 3 and len(b.prompts) >= 12
    for word, i in zip(b.positive_words + b.negative_words, b.positive_ids + b.negative_ids):
        assert smollm2_tokenizer.decode([i]) == word
    assert make_concept(name, smollm2_tokenizer, n=200, seed=0).texts == s.texts  # seeded
    assert make_concept(name, smollm2_tokenizer, n=200, seed=1).texts != s.texts


def test_split_keeps_pairs_together_and_both_labels(smollm2_tokenizer):
    s = make_concept("number", smollm2_tokenizer, n=100)
    train, test = s.split(0.3, seed=2)
    assert len(train) + len(test) == 100 and len(test.pairs) == 15 and len(train.pairs) == 35
    assert not set(train.texts) & set(test.texts)
    for part in (train, test):
        for a, b in part.pairs:
            assert part.labels[a] == 1 and part.labels[b] == 0
    loose = ConceptSet("u", ["a", "b", "c", "d", "e", "f"], [1, 0, 1, 0, 1, 0], [], list("abcdef"))
    tr, te = loose.split(0.34, seed=0)
    assert set(tr.labels) == set(te.labels) == {0, 1}
    with pytest.raises(ConceptError, match="too small to split"):
        ConceptSet("u", ["a", "b"], [1, 0], [(0, 1)], ["a", "b"]).split()


def test_behaviour_score_and_measure(tiny_model_dirs):
    model = mechscope.load_model(str(tiny_model_dirs["llama"]), device="cpu")
    b = Behaviour("t", [5, 7], [9], ["Alice and Bob", "When Mary and John went to the store"], [1, 0])
    logits = torch.randn(3, model.cfg.d_vocab)
    want = (logits[:, 5] + logits[:, 7]) / 2 - logits[:, 9]
    assert torch.allclose(b.score(logits), want)
    got = b.measure(model, batch_size=2)
    for i, prompt in enumerate(b.prompts):  # one prompt at a time, no padding
        ids = [model.tokenizer.bos_token_id] + model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model(torch.tensor([ids]))[0, -1]
        assert float(got[i]) == pytest.approx(float((out[5] + out[7]) / 2 - out[9]), abs=1e-4)
    assert b.accuracy(torch.tensor([1.0, -1.0])) == 1.0 and b.accuracy(torch.tensor([-1.0, -1.0])) == 0.5
    with pytest.raises(ConceptError, match="outside a vocabulary"):
        b.score(torch.randn(2, 8))
    with pytest.raises(ConceptError, match="on both sides"):
        Behaviour("t", [1], [1], ["p"])


def test_load_concept_rows_and_pairs(tmp_path):
    path = tmp_path / "feelings.jsonl"
    rows = [{"positive": "I love it", "negative": "I hate it"}, {"text": "What a joy", "label": 1},
            {"text": "What a pain", "label": False, "word": "pain"},
            {"positive": "so good", "negative": "so bad", "positive_word": "good", "negative_word": "bad"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    s = load_concept(path)
    assert s.name == "feelings" and s.labels == [1, 0, 1, 0, 1, 0] and s.pairs == [(0, 1), (4, 5)]
    assert s.word_types == ["it", "it", "joy", "pain", "good", "bad"]


@pytest.mark.parametrize("content, message", [
    ("", "no rows"),
    ('{"text": "a", "label": 1}\n{"text": "b", "label": 1}', "every row has label 1"),
    ('{"text": "a", "label": 1}\nnot json', "row 2: not valid JSON"),
    ('{"text": "a"}', "row 1: missing field 'label'"),
    ('{"text": "a", "label": 3}', "row 1: field 'label' must be 0 or 1"),
    ('{"positive": "a"}', "row 1: missing field 'negative'"),
    ('{"positive": "a", "negative": ""}', "row 1: field 'negative' must be a non-empty string"),
    ('{"sentence": "a"}', "row 1: expected fields 'text' and 'label'"),
    ('[1, 2]', "row 1: expected a JSON object"),
])
def test_load_concept_errors_name_file_row_and_field(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ConceptError, match=f"{path}: .*{message}" if "row" in message else message):
        load_concept(path)
    with pytest.raises(ConceptError, match="no such file"):
        load_concept(tmp_path / "missing.jsonl")
