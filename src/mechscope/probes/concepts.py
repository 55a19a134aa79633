"""Concept datasets: labelled texts with contrast pairs, for probes, CCS and steering.

Three sets are built in, generated from templates for any tokenizer:

    sentiment  "The movie was wonderful." (1) vs "The movie was awful." (0)
    number     "The dogs near the bridge" (1, plural subject) vs "The dog near the bridge" (0)
    truth      "3 + 4 = 7." (1) vs "3 + 4 = 8." (0), and "9 is greater than 2." vs "2 is greater than 9."

Each text of one side has a contrast text on the other side that differs only in the concept word
(`pairs`), and names that word (`word_types`: the control task of Hewitt & Liang gives each word type a
random label). Each built-in set carries a `Behaviour`: a logit difference at the final position between
words of the label-1 side and words of the label-0 side, on held-out prompts. Answer words are kept
only where the tokenizer makes them a single token; a set whose words all fail on one side has no
behaviour (a warning says so).

User data is a JSONL file of {"text", "label"} rows and/or {"positive", "negative"} contrast pairs
(`load_concept`).
"""

from __future__ import annotations

import json
import os
import random
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from ..errors import MechscopeError, MechscopeWarning, check_count


class ConceptError(MechscopeError, ValueError):
    """A concept set that cannot be used (empty, one class, malformed pairs) or a user file with a bad row."""


CONCEPTS = ("sentiment", "number", "truth")


def single_tokens(tokenizer, words: Sequence[str]) -> dict[str, int]:
    """{word: token id} for the words the tokenizer encodes as exactly one token (no special tokens)."""
    out = {}
    for word in words:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            out[word] = int(ids[0])
    return out


@dataclass
class Behaviour:
    """A behaviour metric on final-position logits: the mean logit over `positive_ids` (the label-1
    side's words) minus the mean over `negative_ids`, read on `prompts`. `prompt_labels`, where given,
    is the side each prompt should favour (1 / 0), so `accuracy` can say how often the model agrees."""

    name: str
    positive_ids: list[int]
    negative_ids: list[int]
    prompts: list[str]
    prompt_labels: list[int] | None = None
    positive_words: list[str] = field(default_factory=list)
    negative_words: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.positive_ids or not self.negative_ids:
            raise ConceptError(f"behaviour {self.name!r} needs at least one token id on each side")
        if set(self.positive_ids) & set(self.negative_ids):
            raise ConceptError(f"behaviour {self.name!r}: a token id is on both sides")
        if self.prompt_labels is not None and len(self.prompt_labels) != len(self.prompts):
            raise ConceptError(f"behaviour {self.name!r}: {len(self.prompt_labels)} prompt labels for "
                               f"{len(self.prompts)} prompts")

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """[batch, d_vocab] -> [batch]: mean logit of the label-1 words minus mean of the label-0 words."""
        if logits.dim() != 2:
            raise ConceptError(f"behaviour {self.name!r} scores [batch, d_vocab] logits, got shape "
                               f"{tuple(logits.shape)}")
        top = max(max(self.positive_ids), max(self.negative_ids))
        if top >= logits.shape[-1]:
            raise ConceptError(f"behaviour {self.name!r}: token id {top} is outside a vocabulary of "
                               f"{logits.shape[-1]} (built for another tokenizer?)")
        pos = torch.tensor(self.positive_ids, dtype=torch.long, device=logits.device)
        neg = torch.tensor(self.negative_ids, dtype=torch.long, device=logits.device)
        logits = logits.float()
        return logits[:, pos].mean(-1) - logits[:, neg].mean(-1)

    def measure(self, model, prompts: Sequence[str] | None = None, batch_size: int | None = None) -> torch.Tensor:
        """The score on each prompt's last real token (BOS in front, right padding), [n_prompts] on the host."""
        from .activations import prompt_logits

        return self.score(prompt_logits(model, list(self.prompts if prompts is None else prompts), batch_size))

    def accuracy(self, scores: torch.Tensor) -> float | None:
        """Fraction of prompts whose score has the sign of its label (None without prompt labels)."""
        if self.prompt_labels is None:
            return None
        want = torch.tensor(self.prompt_labels, device=scores.device).bool()
        return float(((scores > 0) == want).float().mean())


@dataclass
class ConceptSet:
    """Texts labelled 1 (positive sentiment / plural / true) or 0, with contrast pairs (label-1 index,
    label-0 index) and the word carrying the concept in each text."""

    name: str
    texts: list[str]
    labels: list[int]
    pairs: list[tuple[int, int]]
    word_types: list[str]
    behaviour: Behaviour | None = None

    def __post_init__(self):
        n = len(self.texts)
        if n == 0:
            raise ConceptError(f"concept set {self.name!r} is empty")
        if len(self.labels) != n or len(self.word_types) != n:
            raise ConceptError(f"concept set {self.name!r}: {n} texts, {len(self.labels)} labels, "
                               f"{len(self.word_types)} word types")
        bad = [i for i, y in enumerate(self.labels) if y not in (0, 1)]
        if bad:
            raise ConceptError(f"concept set {self.name!r}: label of text {bad[0]} is {self.labels[bad[0]]!r}, "
                               "not 0 or 1")
        self.labels = [int(y) for y in self.labels]
        if len(set(self.labels)) < 2:
            raise ConceptError(f"concept set {self.name!r} has only label {self.labels[0]} ({n} texts); "
                               "a probe needs both labels")
        self.pairs = [(int(a), int(b)) for a, b in self.pairs]
        for a, b in self.pairs:
            if not (0 <= a < n and 0 <= b < n) or self.labels[a] != 1 or self.labels[b] != 0:
                raise ConceptError(f"concept set {self.name!r}: pair ({a}, {b}) is not (a label-1 text, "
                                   "a label-0 text)")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> "ConceptSet":
        """The texts at `indices` (in that order), keeping the pairs whose two texts are both in it."""
        indices = list(indices)
        where = {old: new for new, old in enumerate(indices)}
        pairs = [(where[a], where[b]) for a, b in self.pairs if a in where and b in where]
        return replace(self, texts=[self.texts[i] for i in indices], labels=[self.labels[i] for i in indices],
                       pairs=pairs, word_types=[self.word_types[i] for i in indices])

    def split(self, test_fraction: float = 0.3, seed: int = 0) -> tuple["ConceptSet", "ConceptSet"]:
        """(train, test): a random split in which both texts of a contrast pair land on the same side and
        each side keeps both labels. Texts outside pairs are split within each label."""
        from ..errors import ParameterError

        if not 0 < test_fraction < 1:
            raise ParameterError(f"test_fraction must be between 0 and 1, got {test_fraction}")
        rng = random.Random(seed)
        in_pair = {i for p in self.pairs for i in p}
        units = [list(p) for p in self.pairs]
        rest = [i for i in range(len(self)) if i not in in_pair]
        by_label = {0: [], 1: []}
        for i in rest:
            by_label[self.labels[i]].append([i])
        train, test = [], []
        for group in (units, by_label[0], by_label[1]):
            group = list(group)
            rng.shuffle(group)
            k = round(len(group) * test_fraction)
            if len(group) >= 2:
                k = min(max(k, 1), len(group) - 1)
            for j, unit in enumerate(group):
                (test if j < k else train).extend(unit)
        for part, what in ((train, "training"), (test, "test")):
            if len({self.labels[i] for i in part}) < 2:
                raise ConceptError(f"concept set {self.name!r} ({len(self)} texts) is too small to split: the "
                                   f"{what} part would hold one label only")
        return self.subset(sorted(train)), self.subset(sorted(test))


# --- the built-in sets -----------------------------------------------------------------------------

_SENTIMENT_TEMPLATES = [
    "The movie was {}.", "I thought the food was {}.", "The service at the hotel was {}.",
    "Honestly, the book was {}.", "The concert last night was {}.", "Our trip to the coast was {}.",
    "The new phone is {}.", "Her performance in the play was {}.", "The weather this weekend was {}.",
    "My first day at the new job was {}.", "The game we played was {}.", "The music at the party was {}.",
]
_POSITIVE_ADJ = ["wonderful", "great", "excellent", "amazing", "fantastic", "lovely", "brilliant", "delightful",
                 "superb", "pleasant", "good", "perfect"]
_NEGATIVE_ADJ = ["awful", "terrible", "horrible", "dreadful", "boring", "disappointing", "bad", "poor",
                 "miserable", "unpleasant", "dull", "annoying"]
_SENTIMENT_PROMPTS = [
    "I thought the movie was", "In my opinion, the restaurant was", "Overall, the experience was",
    "The hotel room was", "To be honest, the show was", "I have to say the meal was", "The holiday was",
    "Everyone agreed that the film was", "The story of the novel was", "The atmosphere at the event was",
    "My week has been", "The lecture this morning was",
]
_POSITIVE_WORDS = [" great", " good", " wonderful", " excellent", " amazing", " fantastic", " perfect", " brilliant",
                   " lovely", " nice"]
_NEGATIVE_WORDS = [" bad", " terrible", " awful", " horrible", " boring", " poor", " disappointing", " dull",
                   " awkward", " weak"]

_NOUNS = [("dog", "dogs"), ("cat", "cats"), ("teacher", "teachers"), ("doctor", "doctors"), ("car", "cars"),
          ("house", "houses"), ("tree", "trees"), ("bird", "birds"), ("student", "students"), ("child", "children"),
          ("man", "men"), ("woman", "women"), ("friend", "friends"), ("book", "books"), ("key", "keys"),
          ("box", "boxes"), ("city", "cities"), ("boy", "boys"), ("girl", "girls"), ("player", "players")]
_MODIFIERS = ["near the bridge", "in the garden", "from the village", "on the table", "behind the school",
              "at the station", "next to the river", "in the old photo", "by the window", "across the street"]
_HELD_OUT_MODIFIERS = ["under the stairs", "inside the museum", "beside the lake", "down the road"]
_PLURAL_VERBS = [" are", " were", " have", " do"]
_SINGULAR_VERBS = [" is", " was", " has", " does"]

_TRUE_WORDS = [" true", " correct", " right"]
_FALSE_WORDS = [" false", " wrong", " incorrect"]


def _truth_statement(rng: random.Random, kind: str):
    """(true text, false text, true word, false word) for an arithmetic or a comparison statement."""
    if kind == "sum":
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        wrong = a + b + rng.choice([-2, -1, 1, 2])
        return f"{a} + {b} = {a + b}.", f"{a} + {b} = {wrong}.", str(a + b), str(wrong)
    if kind == "difference":
        a, b = rng.randint(5, 18), rng.randint(1, 4)
        wrong = a - b + rng.choice([-2, -1, 1, 2])
        return f"{a} - {b} = {a - b}.", f"{a} - {b} = {wrong}.", str(a - b), str(wrong)
    a, b = rng.sample(range(1, 20), 2)
    big, small = max(a, b), min(a, b)
    word = rng.choice(["greater", "larger", "bigger"])
    return f"{big} is {word} than {small}.", f"{small} is {word} than {big}.", f"{big}>{small}", f"{small}>{big}"


def _behaviour(name: str, tokenizer, pos_words, neg_words, prompts, prompt_labels=None) -> Behaviour | None:
    pos, neg = single_tokens(tokenizer, pos_words), single_tokens(tokenizer, neg_words)
    if not pos or not neg:
        missing = "label-1" if not pos else "label-0"
        warnings.warn(f"concept {name!r}: none of the {missing} answer words is a single token for this tokenizer; "
                      "the set has no behaviour metric", MechscopeWarning, stacklevel=3)
        return None
    return Behaviour(name, list(pos.values()), list(neg.values()), list(prompts), prompt_labels,
                     list(pos), list(neg))


def _pairs_to_set(name, items, behaviour) -> ConceptSet:
    """items: (label-1 text, label-0 text, label-1 word, label-0 word) -> a ConceptSet, pairs adjacent."""
    texts, labels, pairs, words = [], [], [], []
    for pos, neg, wpos, wneg in items:
        pairs.append((len(texts), len(texts) + 1))
        texts += [pos, neg]
        labels += [1, 0]
        words += [wpos, wneg]
    return ConceptSet(name, texts, labels, pairs, words, behaviour)


def _unique(rng: random.Random, draw, count: int, limit: int = 200):
    """`count` pairs from `draw()` in which no text occurs twice (so no held-out text is also a training
    text), or ConceptError when the templates cannot make that many."""
    seen, out = set(), []
    for _ in range(count * limit):
        item = draw()
        if item[0] in seen or item[1] in seen:
            continue
        seen.update(item[:2])
        out.append(item)
        if len(out) == count:
            return out
    raise ConceptError(f"the templates make only {len(out)} distinct contrast pairs, fewer than the {count} asked for; "
                       "ask for fewer texts (n)")


def make_concept(name: str, tokenizer, n: int = 200, seed: int = 0) -> ConceptSet:
    """The built-in concept set `name` ("sentiment", "number" or "truth"): about `n` texts (n // 2
    contrast pairs), generated with `seed`, with a behaviour metric whose answer words are single tokens
    of `tokenizer`."""
    from ..errors import ParameterError

    if name not in CONCEPTS:
        raise ParameterError(f"unknown concept {name!r}; built-in concepts are {', '.join(CONCEPTS)} "
                             "(or give a JSONL file of your own)")
    n_pairs = check_count("n", n, 2) // 2
    rng = random.Random(seed)
    if name == "sentiment":
        def draw():
            t = rng.choice(_SENTIMENT_TEMPLATES)
            p, q = rng.choice(_POSITIVE_ADJ), rng.choice(_NEGATIVE_ADJ)
            return t.format(p), t.format(q), p, q
        items = _unique(rng, draw, n_pairs)
        behaviour = _behaviour(name, tokenizer, _POSITIVE_WORDS, _NEGATIVE_WORDS, _SENTIMENT_PROMPTS)
    elif name == "number":
        def draw():
            (s, p), m = rng.choice(_NOUNS), rng.choice(_MODIFIERS)
            return f"The {p} {m}", f"The {s} {m}", p, s
        items = _unique(rng, draw, n_pairs)
        prompts, labels = [], []
        for k, (s, p) in enumerate(_NOUNS):
            m = _HELD_OUT_MODIFIERS[k % len(_HELD_OUT_MODIFIERS)]
            prompts += [f"The {p} {m}", f"The {s} {m}"]
            labels += [1, 0]
        behaviour = _behaviour(name, tokenizer, _PLURAL_VERBS, _SINGULAR_VERBS, prompts, labels)
    else:
        kinds = ["sum", "difference", "comparison"]
        items = _unique(rng, lambda: _truth_statement(rng, rng.choice(kinds)), n_pairs)
        held = random.Random(seed + 10_000)
        prompts, labels = [], []
        for k in range(24):
            true, false, *_ = _truth_statement(held, kinds[k % 3])
            prompts += [f"{true} This is", f"{false} This is"]
            labels += [1, 0]
        behaviour = _behaviour(name, tokenizer, _TRUE_WORDS, _FALSE_WORDS, prompts, labels)
    return _pairs_to_set(name, items, behaviour)


# --- user data -------------------------------------------------------------------------------------

def _text_field(path, row, obj, key) -> str:
    if key not in obj:
        raise ConceptError(f"{path}: row {row}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, str) or not value.strip():
        raise ConceptError(f"{path}: row {row}: field {key!r} must be a non-empty string")
    return value


def _word_of(text: str) -> str:
    """The last word of a text, stripped of punctuation (the default word type of a user row)."""
    words = text.strip().split()
    return words[-1].strip(".,;:!?\"'()").lower() or words[-1]


def load_concept(path: str | os.PathLike, tokenizer=None) -> ConceptSet:
    """A concept set from a JSONL file: rows {"text": str, "label": 0|1|true|false} and/or contrast pairs
    {"positive": str, "negative": str} (positive = label 1). An optional "word" field (or
    "positive_word" / "negative_word" on a pair) names the word carrying the concept, for the control
    task; it defaults to the text's last word. The set is named after the file's stem. Errors name the
    file, the row (1-based) and the field. `tokenizer` is accepted for symmetry with `make_concept`
    (user sets carry no behaviour metric)."""
    path = Path(path)
    if not path.is_file():
        raise ConceptError(f"{path}: no such file")
    texts, labels, pairs, words = [], [], [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConceptError(f"{path}: cannot be read ({e})") from None
    for row, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConceptError(f"{path}: row {row}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ConceptError(f"{path}: row {row}: expected a JSON object, got {type(obj).__name__}")
        if "positive" in obj or "negative" in obj:
            pos, neg = _text_field(path, row, obj, "positive"), _text_field(path, row, obj, "negative")
            pairs.append((len(texts), len(texts) + 1))
            texts += [pos, neg]
            labels += [1, 0]
            words += [str(obj.get("positive_word") or _word_of(pos)), str(obj.get("negative_word") or _word_of(neg))]
        elif "text" in obj or "label" in obj:
            text = _text_field(path, row, obj, "text")
            if "label" not in obj:
                raise ConceptError(f"{path}: row {row}: missing field 'label'")
            label = obj["label"]
            if isinstance(label, bool):
                label = int(label)
            if label not in (0, 1) or isinstance(label, float) and not float(label).is_integer():
                raise ConceptError(f"{path}: row {row}: field 'label' must be 0 or 1 (or true / false), got {label!r}")
            texts.append(text)
            labels.append(int(label))
            words.append(str(obj.get("word") or _word_of(text)))
        else:
            raise ConceptError(f"{path}: row {row}: expected fields 'text' and 'label', or 'positive' and "
                               f"'negative'; got {', '.join(map(repr, obj)) or 'no fields'}")
    if not texts:
        raise ConceptError(f"{path}: no rows; expected JSONL rows with 'text' and 'label', or 'positive' and "
                           "'negative'")
    if len(set(labels)) < 2:
        raise ConceptError(f"{path}: every row has label {labels[0]}; a probe needs texts of both labels")
    return ConceptSet(path.stem, texts, labels, pairs, words, None)


def concept_from(spec: str | os.PathLike, tokenizer, n: int = 200, seed: int = 0) -> ConceptSet:
    """A built-in concept by name, or a user JSONL file by path."""
    if str(spec) in CONCEPTS:
        return make_concept(str(spec), tokenizer, n=n, seed=seed)
    return load_concept(spec, tokenizer)
