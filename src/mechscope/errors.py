"""Exceptions mechscope raises for bad input.

Every error a user can cause derives from `MechscopeError`, so the CLI can print its message on one
line and exit non-zero instead of showing a traceback.
"""


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


class MechscopeWarning(UserWarning):
    """A result that is computed but should not be trusted as it stands (the message says why); the
    CLI prints these as `warning:` lines and records them in its summaries."""
