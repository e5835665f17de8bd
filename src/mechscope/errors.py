"""The exception hierarchy of mechscope.

Every error a user can cause derives from :class:`MechscopeError`; the CLI turns it into a one-line
message and exit code 2. Messages name the bad value and list the valid choices.
"""

from __future__ import annotations

__all__ = [
    "MechscopeError",
    "BadInputError",
    "UnknownNameError",
    "IncompatibleTranscodersError",
    "CorruptFileError",
]


class MechscopeError(Exception):
    """Base class of every error mechscope raises on bad user input or bad files."""

    exit_code = 2


class BadInputError(MechscopeError, ValueError):
    """A value given by the user is out of range or malformed (empty prompt, bad token, ...)."""


class UnknownNameError(BadInputError, KeyError):
    """A model, transcoder set or architecture name that mechscope cannot resolve.

    The message lists the names that are known.
    """

    def __init__(self, kind: str, name: str, known: list[str] | tuple[str, ...]):
        self.kind, self.name, self.known = kind, name, list(known)
        choices = ", ".join(self.known) if self.known else "(none)"
        super().__init__(f"unknown {kind} {name!r}; known {kind}s: {choices}")

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.args[0]


class IncompatibleTranscodersError(BadInputError):
    """A transcoder set whose d_model or layer count does not match the model."""


class CorruptFileError(MechscopeError, OSError):
    """A file that exists but cannot be parsed (truncated safetensors, bad JSON, ...)."""
