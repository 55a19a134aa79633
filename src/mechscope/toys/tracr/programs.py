"""The benchmark's suite of RASP programs: six from tracr's library and two written here."""

from __future__ import annotations

from .compile import ProgramSpec


def _reverse():
    from tracr.compiler import lib
    from tracr.rasp import rasp

    return lib.make_reverse(rasp.tokens).named("reverse")


def _sort_unique():
    from tracr.compiler import lib
    from tracr.rasp import rasp

    return lib.make_sort_unique(rasp.tokens, rasp.tokens).named("sort_unique")


def _frac_prevs():
    from tracr.compiler import lib
    from tracr.rasp import rasp

    return lib.make_frac_prevs(rasp.numerical(rasp.Map(lambda t: t == "x", rasp.tokens)).named("is_x")).named("frac_prevs")


def _hist():
    from tracr.compiler import lib

    return lib.make_hist().named("hist")


def _length():
    from tracr.compiler import lib

    return lib.make_length().named("length")


def _shuffle_dyck2():
    from tracr.compiler import lib

    return lib.make_shuffle_dyck2().named("shuffle_dyck2")


def _prev_equal():
    """Whether each token equals the token before it (categorical head + MLP)."""
    from tracr.rasp import rasp

    prev = rasp.Aggregate(rasp.Select(rasp.indices, rasp.indices, lambda k, q: q == k + 1), rasp.tokens,
                          default=None).named("prev_token")
    return rasp.SequenceMap(lambda a, b: a == b, rasp.tokens, prev).named("prev_equal")


def _first_frac():
    """The fraction of tokens so far that equal the first token (categorical head, MLP, numerical
    mean): four components in series."""
    from tracr.rasp import rasp

    first = rasp.Aggregate(rasp.Select(rasp.indices, rasp.indices, lambda k, q: k == 0), rasp.tokens).named("first_token")
    same = rasp.SequenceMap(lambda a, b: a == b, rasp.tokens, first).named("same_as_first")
    same = rasp.numerical(rasp.Map(lambda x: 1 if x else 0, same)).named("same_as_first_num")
    prevs = rasp.Select(rasp.indices, rasp.indices, rasp.Comparison.LEQ).named("prevs")
    return rasp.numerical(rasp.Aggregate(prevs, same, default=0)).named("first_frac")


SUITE: dict[str, ProgramSpec] = {
    "reverse": ProgramSpec(_reverse, ("a", "b", "c"), 5, "the input reversed"),
    "sort_unique": ProgramSpec(_sort_unique, (1, 2, 3, 4, 5), 5, "sort (inputs without repeated tokens)", unique_tokens=True),
    "frac_prevs": ProgramSpec(_frac_prevs, ("x", "y"), 5, "fraction of tokens so far that are 'x'"),
    "hist": ProgramSpec(_hist, ("a", "b", "c"), 5, "how often each token occurs"),
    "length": ProgramSpec(_length, ("a", "b", "c"), 5, "the input's length", pad_counterfactuals=True),
    "shuffle_dyck2": ProgramSpec(_shuffle_dyck2, ("(", ")", "{", "}"), 4, "1 if both bracket types balance (shuffled)"),
    "prev_equal": ProgramSpec(_prev_equal, ("a", "b", "c"), 5, "whether each token repeats the previous one (ours)"),
    "first_frac": ProgramSpec(_first_frac, ("a", "b", "c"), 5, "fraction of tokens so far equal to the first (ours)"),
}
