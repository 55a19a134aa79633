"""Exceptions mechscope raises for bad input.

Every error a user can cause derives from `MechscopeError`, so the CLI can print its message on one
line and exit non-zero instead of showing a traceback. `check_count` and `check_finite` are the
checks the library's entry points share for counts (steps, batch sizes) and for NaN / infinite values.
"""

import operator


class MechscopeError(Exception):
    """Base class: a problem with the user's input or environment, explained in the message."""


class UnknownModelError(MechscopeError, KeyError):
    """A model spec that is neither a registry alias, a GGUF file, a directory nor a hub id."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class ModelNotInstalledError(MechscopeError):
    """A registry model whose weight package is not installed."""


class ModelLoadError(MechscopeError):
    """A model file or directory that exists but cannot be read."""


class ParameterError(MechscopeError, ValueError):
    """A function argument or command-line option outside its range (a step count, batch size,
    fraction, ...) or not one of its choices."""


class NonFiniteError(MechscopeError, ValueError):
    """Scores or metric values that are NaN or infinite where a curve or report would use them; the
    message says what was not finite and where it came from."""


def check_count(name: str, value, minimum: int = 1) -> int:
    """`value` as an int, or ParameterError unless it is an integer (not a bool) >= `minimum`."""
    try:
        count = operator.index(value)  # an int, or a numpy / torch integer
    except TypeError:
        count = None
    if count is None or isinstance(value, bool):
        raise ParameterError(f"{name} must be an integer, not {type(value).__name__} {value!r}")
    if count < minimum:
        raise ParameterError(f"{name} must be at least {minimum}, got {count}")
    return count


def check_finite(values, what: str, hint: str = "") -> None:
    """NonFiniteError unless every entry of the tensor `values` is finite; `what` names the values
    and where they came from ("eap-ig scores", "the metric on the clean run", ...), `hint` what to
    try."""
    bad = ~values.isfinite()
    n_bad = int(bad.sum())
    if n_bad:
        n_nan = int(values.isnan().sum())
        kinds = " and ".join(k for k, c in (("NaN", n_nan), ("infinite", n_bad - n_nan)) if c)
        raise NonFiniteError(f"{what}: {n_bad} of {values.numel()} values are {kinds}" + (f"; {hint}" if hint else ""))


class MechscopeWarning(UserWarning):
    """A result that is computed but should not be trusted as it stands (the message says why); the
    CLI prints these as `warning:` lines and records them in its summaries."""
