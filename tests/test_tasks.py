"""Built-in task generators: invariants over thousands of generated examples per task.

The tiny BPE tokenizer carries the property-based tests (Hypothesis draws seeds and options); the real
SmolLM2 and Gemma-3 tokenizers are covered by the slow tests, which also pin down how Greater-Than is
scored for a tokenizer that writes one digit per token.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mechscope.data import DatasetError, PromptPairDataset
from mechscope.data.dataset import validate_example
from mechscope.tasks import TASKS, make_task, task_options

TASK_NAMES = ("ioi", "greater-than", "winobias", "induction")
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
N_PER_DRAW = 50  # x 60 Hypothesis examples = 3,000 prompt pairs per task with the tiny tokenizer
OPTIONS = {
    "ioi": st.fixed_dictionaries({"templates": st.sampled_from(["ABBA", "BABA", "both"])}),
    "greater-than": st.just({}),
    "winobias": st.fixed_dictionaries({"variant": st.sampled_from(["pro", "anti", "both"])}),
    "induction": st.fixed_dictionaries({"length": st.integers(2, 12)}),
}


# ------------------------------------------------------------------------------------------------
# Checks shared by every task
# ------------------------------------------------------------------------------------------------


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids))


def spans(ds: PromptPairDataset, ex, which: str = "clean") -> dict[str, list[int]]:
    ids = getattr(ex, which)
    return {name: ids[a:b] for name, (a, b) in zip(ds.schema.spans, ex.span_bounds())}


def check_invariants(ds: PromptPairDataset, tokenizer, task: str, prepend_bos: bool = True) -> None:
    assert ds.task == task
    assert ds.metric == {"greater-than": "prob_diff"}.get(task, "logit_diff")
    assert ds.schema.spans[0] == "bos" if prepend_bos else "bos" not in ds.schema.spans
    expected_pad = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    assert ds.pad_token_id == expected_pad
    ds.validate()
    for i, ex in enumerate(ds.examples):
        validate_example(ex, ds.schema, f"example {i}")
        assert len(ex.clean) == len(ex.counterfactual)
        bounds = ex.span_bounds()
        assert len(bounds) == len(ds.schema)
        assert bounds[0][0] == 0 and bounds[-1][1] == len(ex.clean)
        assert all(a <= b for a, b in bounds)
        assert all(prev[1] == nxt[0] for prev, nxt in zip(bounds, bounds[1:]))
        assert ex.span_of_positions() == sorted(ex.span_of_positions())
        assert len(ex.span_of_positions()) == len(ex.clean)
        for which, text in (("clean", ex.clean_text), ("counterfactual", ex.counterfactual_text)):
            pieces = spans(ds, ex, which)
            if prepend_bos:
                assert pieces.pop("bos") == [tokenizer.bos_token_id]
            # Spans fall on token boundaries, so span by span the tokens spell out the prompt.
            assert "".join(decode(tokenizer, p) for p in pieces.values()) == text
        for answer in ex.correct + ex.wrong:
            text = decode(tokenizer, [answer])
            assert tokenizer(text, add_special_tokens=False)["input_ids"] == [answer]
        CHECKS[task](ds, ex, tokenizer)


def check_ioi(ds, ex, tokenizer) -> None:
    m = ex.meta
    io, s = m["io"], m["s"]
    x, y, z = m["cf_names"]
    assert len({io, s, x, y, z}) == 5
    clean, cf = spans(ds, ex), spans(ds, ex, "counterfactual")
    assert decode(tokenizer, clean[m["io_span"]]) == " " + io
    assert decode(tokenizer, clean[m["s1_span"]]) == " " + s
    assert decode(tokenizer, clean["s2"]) == " " + s
    assert {m["io_span"], m["s1_span"]} == {"name_1", "name_2"}
    assert (m["io_span"] == "name_1") == (m["order"] == "ABBA")
    assert [decode(tokenizer, cf[k]) for k in ("name_1", "name_2", "s2")] == [" " + x, " " + y, " " + z]
    assert all(len(clean[k]) == 1 for k in ("name_1", "name_2", "s2"))
    assert decode(tokenizer, ex.correct) == " " + io and decode(tokenizer, ex.wrong) == " " + s
    assert clean["s2"] == ex.wrong and clean[m["io_span"]] == ex.correct
    for name in ("intro", "and", "context", "action", "end"):
        assert clean[name] == cf[name]
    assert decode(tokenizer, clean["end"]) == " to"


def check_greater_than(ds, ex, tokenizer) -> None:
    m = ex.meta
    xx, yy = m["century"], m["yy"]
    assert m["start_year"] == 100 * xx + yy and m["counterfactual_start_year"] == 100 * xx + 1
    clean, cf = spans(ds, ex), spans(ds, ex, "counterfactual")
    assert decode(tokenizer, clean["xx2"]) == f" {xx}" == decode(tokenizer, cf["xx2"])
    if ds.info["segmentation"] == "split":
        assert decode(tokenizer, clean["xx1"]) == f" {xx}" == decode(tokenizer, cf["xx1"])
        assert decode(tokenizer, clean["yy"]) == f"{yy:02d}" and decode(tokenizer, cf["yy"]) == "01"
    else:
        assert decode(tokenizer, clean["xxyy"]) == f" {m['start_year']}"
        assert decode(tokenizer, cf["xxyy"]) == f" {m['counterfactual_start_year']}"
    assert ex.clean_text.endswith(f" the year {xx}")
    correct = [decode(tokenizer, [i]) for i in ex.correct]
    wrong = [decode(tokenizer, [i]) for i in ex.wrong]
    if ds.info["scoring"] == "two-digit":
        assert correct == [f"{v:02d}" for v in range(yy + 1, 100)]
        assert wrong == [f"{v:02d}" for v in range(0, yy + 1)]
    else:
        tens = yy // 10
        assert 1 <= tens <= 8
        assert correct == [str(d) for d in range(tens + 1, 10)]
        assert wrong == [str(d) for d in range(tens)]
    assert ex.wrong, "both answer sets are non-empty"


def check_winobias(ds, ex, tokenizer) -> None:
    m = ex.meta
    clean, cf = spans(ds, ex), spans(ds, ex, "counterfactual")
    first, second = (
        decode(tokenizer, clean["first_profession"]),
        decode(tokenizer, clean["second_profession"]),
    )
    assert {first, second} == {" " + m["referent"], " " + m["other"]}
    assert (first == " " + m["referent"]) == (m["referent_position"] == "first")
    assert (
        decode(tokenizer, ex.correct) == " " + m["referent"]
        and decode(tokenizer, ex.wrong) == " " + m["other"]
    )
    for k in ("first_pronoun", "second_pronoun"):
        assert decode(tokenizer, clean[k]) == " " + m["pronoun"]
        assert decode(tokenizer, cf[k]) == " " + m["counterfactual_pronoun"]
    assert {m["pronoun"], m["counterfactual_pronoun"]} == {"he", "she"}
    matches = (m["pronoun"] == "she") == (m["referent_stereotype"] == "female")
    assert matches == (m["variant"] == "pro")
    for k in ("first_profession", "second_profession", "circumstances", "refers", "the"):
        assert clean[k] == cf[k]
    assert ex.clean_text.endswith(" refers to the")


def check_induction(ds, ex, tokenizer) -> None:
    seq, other = ex.meta["sequence"], ex.meta["counterfactual_sequence"]
    clean, cf = spans(ds, ex), spans(ds, ex, "counterfactual")
    assert clean["first"] == seq and cf["first"] == other
    assert clean["second"] == seq[:-2] == cf["second"]
    assert clean["last"] == [seq[-2]] == cf["last"]
    assert ex.correct == [seq[-1]] and ex.wrong == []
    assert len(set(seq) | set(other)) == 2 * len(seq), "distinct tokens, none shared with the counterfactual"
    for t in seq + other:
        text = decode(tokenizer, [t])
        assert text[0] == " " and text[1:].isalpha()


CHECKS = {
    "ioi": check_ioi,
    "greater-than": check_greater_than,
    "winobias": check_winobias,
    "induction": check_induction,
}


def check_round_trip(ds: PromptPairDataset, path) -> None:
    back = PromptPairDataset.load(ds.save(path))
    assert [e.to_json() for e in back.examples] == [e.to_json() for e in ds.examples]
    assert back.schema == ds.schema and back.info == ds.info
    assert (back.task, back.metric, back.tokenizer, back.pad_token_id) == (
        ds.task,
        ds.metric,
        ds.tokenizer,
        ds.pad_token_id,
    )


# ------------------------------------------------------------------------------------------------
# Tiny tokenizer: property-based
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASK_NAMES)
def test_generated_examples_hold_the_invariants(task, tiny_tokenizer):
    schemas = set()

    @SETTINGS
    @given(seed=st.integers(0, 2**32 - 1), options=OPTIONS[task])
    def run(seed, options):
        ds = make_task(task, tiny_tokenizer, N_PER_DRAW, seed=seed, **options)
        assert len(ds) == N_PER_DRAW
        check_invariants(ds, tiny_tokenizer, task)
        schemas.add(ds.schema)

    run()
    assert len(schemas) == 1, "one schema per task and tokenizer, whatever the seed and options"


@pytest.mark.parametrize("task", TASK_NAMES)
@SETTINGS
@given(seed=st.integers(0, 2**32 - 1))
def test_same_seed_same_dataset(task, seed, tiny_tokenizer):
    a = make_task(task, tiny_tokenizer, 8, seed=seed)
    b = make_task(task, tiny_tokenizer, 8, seed=seed)
    assert [e.to_json() for e in a.examples] == [e.to_json() for e in b.examples]
    assert a.info == b.info and a.schema == b.schema


@pytest.mark.parametrize("task", TASK_NAMES)
def test_different_seeds_differ(task, tiny_tokenizer):
    a = make_task(task, tiny_tokenizer, 20, seed=1)
    b = make_task(task, tiny_tokenizer, 20, seed=2)
    assert [e.clean for e in a.examples] != [e.clean for e in b.examples]


@pytest.mark.parametrize("task", TASK_NAMES)
def test_jsonl_round_trip(task, tiny_tokenizer, tmp_path):
    ds = make_task(task, tiny_tokenizer, 200, seed=7)
    check_round_trip(ds, tmp_path / f"{task}.jsonl")


@pytest.mark.parametrize("task", TASK_NAMES)
def test_without_bos(task, tiny_tokenizer):
    ds = make_task(task, tiny_tokenizer, 100, seed=3, prepend_bos=False)
    assert "bos" not in ds.schema.spans
    check_invariants(ds, tiny_tokenizer, task, prepend_bos=False)


def test_schemas(tiny_tokenizer):
    names = {task: make_task(task, tiny_tokenizer, 1).schema.spans for task in TASK_NAMES}
    assert names["ioi"] == ("bos", "intro", "name_1", "and", "name_2", "context", "s2", "action", "end")
    assert names["winobias"][:5] == ("bos", "intro", "first_profession", "interaction", "second_profession")
    assert names["induction"] == ("bos", "first", "second", "last")
    # The tiny tokenizer writes most 17xx years as one token, so the start year is one span there.
    assert names["greater-than"] == ("bos", "the", "noun", "verb", "year_1", "xxyy", "to", "year_2", "xx2")


def test_options_select_variants(tiny_tokenizer):
    assert {e.meta["order"] for e in make_task("ioi", tiny_tokenizer, 200, templates="BABA").examples} == {
        "BABA"
    }
    assert {e.meta["order"] for e in make_task("ioi", tiny_tokenizer, 200).examples} == {"ABBA", "BABA"}
    assert {
        e.meta["variant"] for e in make_task("winobias", tiny_tokenizer, 200, variant="anti").examples
    } == {"anti"}
    both = make_task("winobias", tiny_tokenizer, 400)
    assert {e.meta["variant"] for e in both.examples} == {"pro", "anti"}
    assert {e.meta["referent_position"] for e in both.examples} == {"first", "second"}
    ds = make_task("induction", tiny_tokenizer, 5, length=4)
    assert all(len(e.clean) == 1 + 4 + 3 for e in ds.examples)
    assert task_options("induction") == {"length": 10}


def test_unknown_task_lists_the_tasks(tiny_tokenizer):
    with pytest.raises(DatasetError) as err:
        make_task("ioi2", tiny_tokenizer, 3)
    for name in TASKS:
        assert name in str(err.value)
    assert set(TASKS) == set(TASK_NAMES)


@pytest.mark.parametrize(
    "task, options, match",
    [
        ("ioi", {"templates": "ABC"}, "templates"),
        ("winobias", {"variant": "neutral"}, "variant"),
        ("induction", {"length": 1}, "length"),
        ("ioi", {"length": 4}, "no option 'length'"),
        ("greater-than", {"templates": "both"}, "no option"),
    ],
)
def test_bad_options(task, options, match, tiny_tokenizer):
    with pytest.raises(DatasetError, match=match):
        make_task(task, tiny_tokenizer, 3, **options)


def test_hopeless_draws_end_with_the_last_problem(tiny_tokenizer):
    from mechscope.tasks._build import TRIES_BASE, build

    calls = []

    def draw(rng):
        calls.append(1)
        raise DatasetError("this draw never fits")

    with pytest.raises(DatasetError, match="built only 0 of 1000 .*Last problem: this draw never fits"):
        build("demo", "logit_diff", tiny_tokenizer, 1000, 0, True, ["x"], draw, {})
    assert len(calls) == TRIES_BASE


def test_bad_counts(tiny_tokenizer):
    assert len(make_task("ioi", tiny_tokenizer, 0)) == 0
    with pytest.raises(DatasetError, match="non-negative"):
        make_task("ioi", tiny_tokenizer, -1)


# ------------------------------------------------------------------------------------------------
# Other tokenizers built here: where nothing valid exists, and GPT-2-style two-digit years
# ------------------------------------------------------------------------------------------------


def _bpe(lines, vocab_size, pre_tokenizer=None, bos=True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|bos|>", "<|eos|>"] if bos else ["<|eos|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    kwargs = {"bos_token": "<|bos|>"} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", **kwargs)


def test_tokenizer_without_words_gives_clear_errors():
    # Almost bytes only: no name, occupation or word is a single token.
    tok = _bpe(["a b c"], 262)
    with pytest.raises(DatasetError, match="single tokens.*only 0 of"):
        make_task("ioi", tok, 3)
    with pytest.raises(DatasetError, match="stereotypically .* occupation"):
        make_task("winobias", tok, 3)
    with pytest.raises(DatasetError, match="needs 20 distinct word tokens"):
        make_task("induction", tok, 3)
    ds = make_task("greater-than", tok, 20)  # digits are always single bytes
    check_invariants(ds, tok, "greater-than")


def test_tokenizer_without_bos():
    import tiny

    tok = _bpe(tiny.corpus(), 700, bos=False)
    with pytest.raises(DatasetError, match="no BOS"):
        make_task("ioi", tok, 3)
    ds = make_task("ioi", tok, 50, prepend_bos=False)
    check_invariants(ds, tok, "ioi", prepend_bos=False)
    assert ds.pad_token_id == tok.eos_token_id


def test_two_digit_scoring_for_a_gpt2_style_tokenizer():
    # Years pre-split as " 17" + "32", with every two-digit string in the vocabulary: GPT-2's case.
    from tokenizers import Regex, pre_tokenizers

    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r" ?\d\d"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    lines = [f"{v:02d}" for v in range(100)] + [
        f"The war lasted from the year {c} to the year" for c in range(11, 20)
    ]
    tok = _bpe(lines, 600, pre_tokenizer=pre)
    ds = make_task("greater-than", tok, 500, seed=0)
    assert ds.info["scoring"] == "two-digit" and ds.info["segmentation"] == "split"
    assert "xx1" in ds.schema.spans and "yy" in ds.schema.spans
    check_invariants(ds, tok, "greater-than")
    assert {e.meta["yy"] for e in ds.examples} - set(range(2, 99)) == set()


# ------------------------------------------------------------------------------------------------
# Real tokenizers (slow)
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("task", TASK_NAMES)
def test_smollm2_tokenizer(task, smollm2_tokenizer, tmp_path):
    ds = make_task(task, smollm2_tokenizer, 1000, seed=11)
    check_invariants(ds, smollm2_tokenizer, task)
    check_round_trip(ds, tmp_path / "ds.jsonl")
    again = make_task(task, smollm2_tokenizer, 50, seed=11)
    assert [e.to_json() for e in again.examples] == [e.to_json() for e in ds.examples[:50]]


@pytest.mark.slow
def test_smollm2_greater_than_is_scored_on_the_next_digit(smollm2_tokenizer):
    ds = make_task("greater-than", smollm2_tokenizer, 200)
    assert ds.info["scoring"] == "next-digit"
    assert "next digit" in ds.info["scoring_note"]
    # SmolLM2 writes " 1732" as " ", "1", "7", "3", "2": the century splits from the rest.
    assert ds.info["segmentation"] == "split"
    assert ds.schema.spans == ("bos", "the", "noun", "verb", "year_1", "xx1", "yy", "to", "year_2", "xx2")
    for ex in ds.examples:
        assert len(ex.correct) + len(ex.wrong) == 9
        assert decode(smollm2_tokenizer, ex.clean[-3:]) == f" {ex.meta['century']}"


@pytest.mark.slow
def test_smollm2_keeps_most_words(smollm2_tokenizer):
    from mechscope.tasks.ioi import usable_names
    from mechscope.tasks.winobias import usable_occupations

    assert len(usable_names(smollm2_tokenizer)) >= 40
    found = usable_occupations(smollm2_tokenizer)
    assert len(found["male"]) >= 8 and len(found["female"]) >= 8


@pytest.fixture(scope="module")
def gemma3_tokenizer():
    from mechscope.models import load_tokenizer

    return load_tokenizer("gemma3-270m")


@pytest.mark.slow
@pytest.mark.parametrize("task", TASK_NAMES)
def test_gemma3_tokenizer(task, gemma3_tokenizer):
    ds = make_task(task, gemma3_tokenizer, 200, seed=5)
    check_invariants(ds, gemma3_tokenizer, task)
    if task == "greater-than":
        assert ds.info["scoring"] == "next-digit"
