"""A tiny progress reporter for long command-line work and Python-loop sampling (no dependencies).

One line on stderr, redrawn in place on a terminal::

    demo [#########...........] 9/21  running 5 repetitions: hand-written cache  3.1 s

It is shown only when stderr is a terminal, or when forced (``--progress`` / ``KVHOIST_PROGRESS=1``);
``--no-progress`` or ``KVHOIST_PROGRESS=0`` turn it off. When forced onto something that is not a
terminal (a log file), each update is a line of its own, at most one per ``min_interval`` seconds.

A :class:`Progress` is also a ``callback(done, total)``, the form ``wan_ref.sample(..., loop="python",
progress=...)`` calls after every step. Jitted loops (``lax.scan`` / ``fori_loop``) run as one program and
cannot report per step without host callbacks (which would keep kvhoist from moving work out of the loop):
for them, report phases (:meth:`Progress.phase`: tracing, compiling, running N repetitions) instead.

Example:
    >>> with Progress("sample", total=50) as bar:
    ...     out = sample(model, noise, pe, npe, num_inference_steps=50, loop="python", progress=bar)
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

__all__ = ["ENV", "Progress", "progress_enabled"]

#: The environment variable that turns progress off (``0``) or forces it on (``1``) when no flag says.
ENV = "KVHOIST_PROGRESS"


def progress_enabled(flag: bool | None = None, stream: TextIO | None = None) -> bool:
    """Whether to show progress: ``flag`` when given (``--progress`` / ``--no-progress``), else
    ``KVHOIST_PROGRESS`` (``0``/``false``/``no``/``off``: off; any other non-empty value: on), else
    whether ``stream`` (default stderr) is a terminal.

    Raises:
      ValueError: ``KVHOIST_PROGRESS`` is set to something that is neither on nor off.
    """
    if flag is not None:
        return bool(flag)
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    if value:
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: use 1 (show progress) or 0 (never)")
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Progress:
    """A one-line progress reporter: a bar when the total is known, else a phase and the elapsed time.

    Args:
      label: what is running (``"demo"``, ``"sample"``), the line's first word.
      total: number of units of work (steps, timed calls), or None for phases only.
      stream: where to write (default: stderr).
      enabled: True / False to force; None decides by :func:`progress_enabled` (terminal, environment).
      min_interval: least seconds between two redraws (the last update is always drawn).
      width: characters of the bar.

    A disabled reporter accepts every call and writes nothing. Use it as a context manager (or call
    :meth:`close`) so the line ends with a newline.

    Raises:
      ValueError: a negative ``total``, ``min_interval`` or a ``width`` < 1.
    """

    def __init__(self, label: str, total: int | None = None, *, stream: TextIO | None = None,
                 enabled: bool | None = None, min_interval: float = 0.1, width: int = 20) -> None:
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 0):
            raise ValueError(f"Progress total must be an integer >= 0 or None, got {total!r}")
        if min_interval < 0:
            raise ValueError(f"Progress min_interval must be >= 0, got {min_interval!r}")
        if width < 1:
            raise ValueError(f"Progress width must be >= 1, got {width!r}")
        self.label = label
        self.total = total
        self.done = 0
        self.stream = sys.stderr if stream is None else stream
        self.enabled = progress_enabled(enabled, self.stream)
        isatty = getattr(self.stream, "isatty", None)
        self.inline = bool(isatty and isatty())      # redraw in place; else one line per update
        self.min_interval = min_interval if self.inline else max(min_interval, 1.0)
        self.width = width
        self.text = ""
        self._start = time.perf_counter()
        self._last_draw = -float("inf")
        self._drawn = 0          # characters of the line on screen (inline mode)
        self._state: tuple = ()  # (done, total, text) last drawn
        self._closed = False

    # -- updates -------------------------------------------------------------------------------------
    def __call__(self, done: int, total: int | None = None) -> None:
        """Set the count to ``done`` (of ``total``, when given): the ``progress=`` callback form."""
        if total is not None:
            self.total = total
        self.done = done
        self._draw(final=self.total is not None and done >= self.total)

    def update(self, n: int = 1) -> None:
        """Advance the count by ``n``."""
        self(self.done + n)

    def phase(self, text: str) -> None:
        """Show what is being done now (``"compiling plain jax.jit"``); drawn at once."""
        self.text = text
        self._draw(final=True)

    def write(self, line: str) -> None:
        """Print ``line`` to the stream without breaking the progress line (it is redrawn below)."""
        if self.enabled and self.inline and self._drawn:
            self.stream.write("\r" + " " * self._drawn + "\r")
            self._drawn = 0
        self.stream.write(line + "\n")
        self.stream.flush()
        if self.enabled and self.inline and not self._closed:
            self._draw(final=True)

    def close(self) -> None:
        """Draw the final state and end the line."""
        if self._closed:
            return
        if self.enabled:
            if self._state != (self.done, self.total, self.text):  # not drawn yet: draw the final state
                self._draw(final=True)
            if self.inline and self._drawn:
                self.stream.write("\n")
                self.stream.flush()
        self._closed = True

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- drawing -------------------------------------------------------------------------------------
    def render(self) -> str:
        """The line as it would be drawn now."""
        parts = [self.label]
        if self.total:
            filled = min(self.width, self.width * self.done // self.total)
            parts.append("[" + "#" * filled + "." * (self.width - filled) + "]")
            parts.append(f"{self.done}/{self.total}")
        if self.text:
            parts.append(" " + self.text)
        parts.append(f" {time.perf_counter() - self._start:.1f} s")
        return " ".join(parts)

    def _draw(self, final: bool) -> None:
        if not self.enabled or self._closed:
            return
        now = time.perf_counter()
        if not final and now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        self._state = (self.done, self.total, self.text)
        line = self.render()
        if self.inline:
            pad = max(0, self._drawn - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._drawn = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
