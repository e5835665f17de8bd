"""Progress on a terminal: phase lines and bars for long work, quiet for scripts.

Every command that can take more than a few seconds reports what it is doing on stderr when
stderr is a terminal, and nothing when it is not (a pipe, a file, CI) or when the command prints
JSON. Library functions take a ``progress`` argument (a :class:`Progress`, or a bool) and never
decide on their own; the CLI builds one with :meth:`Progress.for_terminal`.
"""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    """Phase lines (``[  12.3 s] pruning``) and tqdm bars, all on stderr, or nothing when disabled."""

    def __init__(self, enabled: bool = False):
        self.enabled = bool(enabled)
        self._start = time.perf_counter()

    @classmethod
    def for_terminal(cls, quiet: bool = False) -> "Progress":
        """Enabled when stderr is a terminal and the command is not ``quiet`` (``--json``)."""
        return cls(not quiet and sys.stderr.isatty())

    @classmethod
    def of(cls, progress: "Progress | bool | None") -> "Progress":
        """Accept a :class:`Progress` or a plain bool (older call sites)."""
        return progress if isinstance(progress, Progress) else cls(bool(progress))

    def phase(self, text: str) -> None:
        """One line saying what starts now, with the seconds since this object was made."""
        if self.enabled:
            from tqdm.auto import tqdm

            tqdm.write(f"[{time.perf_counter() - self._start:7.1f} s] {text}", file=sys.stderr)

    def bar(self, **kwargs):
        """A tqdm bar on stderr (disabled when progress is off)."""
        from tqdm.auto import tqdm

        return tqdm(disable=not self.enabled, file=sys.stderr, **kwargs)
