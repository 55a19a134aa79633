"""Indirect object identification (IOI; Wang et al. 2023).

"When Mary and John went to the store, John gave a drink to" → " Mary". Two people are introduced, one
of them (the subject, S) is named again, and the model should complete with the other one (the
indirect object, IO). The task measures the name-mover machinery: finding the duplicated name and
copying the non-duplicated one.

Scoring: logit difference, logit(" " + IO) − logit(" " + S), at the last position.

Counterfactual: the "ABC" corruption. The same sentence with three fresh, distinct names in place of
the two introductions and the repeated subject, so no name repeats and nothing singles out an indirect
object; the sentence structure and token length stay the same.

Orders: ABBA puts the IO first ("When Mary and John ..., John ...") and BABA puts the subject first
("When John and Mary ..., John ..."). Span names are positional (`name_1`, `name_2`), so both orders
share one schema; `meta["io_span"]` says which of them holds the IO.
"""

from __future__ import annotations

import random

from ..data import DatasetError, PromptPair, make_pair, single_token
from ._build import build, check_common, choose_option, segments, span_tokens

SEGMENTS = ("intro", "name_1", "and", "name_2", "context", "s2", "action", "end")

# Common English first names; only those that are one token after a space survive for a tokenizer.
NAMES = (
    "Mary", "John", "Alice", "Bob", "Sarah", "Tom", "Anna", "James", "Kate", "Paul", "Laura", "Mark",
    "Michael", "David", "Daniel", "Robert", "William", "Richard", "Thomas", "Emma", "Emily", "Jessica",
    "Lisa", "Susan", "Karen", "Linda", "Helen", "Rachel", "Peter", "George", "Edward", "Jack", "Henry",
    "Sam", "Adam", "Ryan", "Kevin", "Brian", "Steven", "Jennifer", "Amy", "Nancy", "Jane", "Anne", "Ben",
    "Chris", "Joe", "Mike", "Dan", "Frank", "Grace", "Lucy", "Rose", "Andrew", "Matthew", "Jason",
    "Eric", "Nick", "Tim", "Julia",
)  # fmt: skip
PLACES = (
    "store", "park", "school", "garden", "office", "station", "restaurant", "hospital", "library",
    "beach", "market", "museum", "cafe", "river", "bakery",
)  # fmt: skip
# Objects all take the article "a" (no vowel sounds), so one article fits every template.
OBJECTS = (
    "drink", "book", "ball", "gift", "letter", "ring", "bone", "key", "cake", "basket", "flower", "pen",
    "phone", "hat", "snack",
)  # fmt: skip

# (intro, context, action): the sentence is
#   intro + " " + name_1 + " and" + " " + name_2 + context + " " + s2 + action + " to".
# The context ends with the punctuation before the repeated name; {place} / {object} are filled in.
TEMPLATES = (
    ("When", " went to the {place},", " gave a {object}"),
    ("After", " arrived at the {place},", " handed a {object}"),
    ("Then,", " had a long day at the {place}.", " gave a {object}"),
    ("While", " were walking to the {place},", " passed a {object}"),
    ("Yesterday", " cleaned up the {place}, and then", " brought a {object}"),
    ("Once", " got to the {place},", " threw a {object}"),
    ("As soon as", " reached the {place},", " offered a {object}"),
    ("Friends", " found a {object} at the {place}.", " gave it"),
)
END = " to"
ORDERS = ("ABBA", "BABA")
# Two names in the clean prompt and three other ones in the counterfactual.
MIN_NAMES = 5


def template_text(template: tuple[str, str, str], order: str) -> str:
    """A readable form of a template, e.g. 'When [A] and [B] went to the {place}, [B] gave a {object} to'."""
    intro, context, action = template
    first, second = ("[A]", "[B]") if order == "ABBA" else ("[B]", "[A]")
    return f"{intro} {first} and {second}{context} [B]{action}{END}"


def usable_names(tokenizer) -> list[str]:
    """The built-in names that are a single token with a leading space for `tokenizer`."""
    return [name for name in NAMES if single_token(tokenizer, " " + name) is not None]


def make_ioi(
    tokenizer,
    n: int,
    seed: int = 0,
    prepend_bos: bool = True,
    templates: str = "both",
):
    """IOI prompt pairs with the ABC counterfactual; `templates` is "ABBA", "BABA" or "both"."""
    check_common(tokenizer, n, prepend_bos)
    choose_option("templates", templates, ("ABBA", "BABA", "both"))
    orders = ORDERS if templates == "both" else (templates,)
    names = usable_names(tokenizer)
    if len(names) < MIN_NAMES:
        raise DatasetError(
            f"task 'ioi' needs at least {MIN_NAMES} first names that are single tokens (with a leading "
            f"space) for this tokenizer; only {len(names)} of the {len(NAMES)} built-in names are: {names}"
        )
    name_id = {name: single_token(tokenizer, " " + name) for name in names}

    def draw(rng: random.Random) -> PromptPair:
        t = rng.randrange(len(TEMPLATES))
        intro, context, action = TEMPLATES[t]
        order = rng.choice(orders)
        io, s, x, y, z = rng.sample(names, MIN_NAMES)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        context = context.format(place=place, object=obj)
        action = action.format(place=place, object=obj)
        first, second = (io, s) if order == "ABBA" else (s, io)

        def sentence(n1: str, n2: str, n3: str) -> list[tuple[str, str]]:
            texts = (intro, " " + n1, " and", " " + n2, context, " " + n3, action, END)
            return segments(SEGMENTS, texts)

        ex = make_pair(
            tokenizer,
            sentence(first, second, s),
            sentence(x, y, z),
            [" " + io],
            [" " + s],
            prepend_bos,
            meta={
                "template": t,
                "order": order,
                "io": io,
                "s": s,
                "io_span": "name_1" if order == "ABBA" else "name_2",
                "s1_span": "name_2" if order == "ABBA" else "name_1",
                "cf_names": [x, y, z],
                "place": place,
                "object": obj,
            },
        )
        # A name must stay the very token the answer is scored on, even inside the sentence.
        spans = [("clean", "name_1", first), ("clean", "name_2", second), ("clean", "s2", s)]
        spans += [
            ("counterfactual", "name_1", x),
            ("counterfactual", "name_2", y),
            ("counterfactual", "s2", z),
        ]
        full = (("bos",) if prepend_bos else ()) + SEGMENTS
        for which, span, name in spans:
            if span_tokens(ex, full, span, which) != [name_id[name]]:
                text = ex.clean_text if which == "clean" else ex.counterfactual_text
                raise DatasetError(f"name {name!r} is not its own single token inside {text!r}")
        return ex

    info = {
        "options": {"templates": templates},
        "templates": [template_text(tpl, order) for order in orders for tpl in TEMPLATES],
        "names": names,
        "places": list(PLACES),
        "objects": list(OBJECTS),
        "scoring": "logit_diff",
        "scoring_note": "logit of ' '+IO minus logit of ' '+S at the last position; the counterfactual "
        "replaces all three name mentions by three fresh distinct names (ABC).",
    }
    return build("ioi", "logit_diff", tokenizer, n, seed, prepend_bos, SEGMENTS, draw, info)
