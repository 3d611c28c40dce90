"""Ctrl-C in the command line: one line on stderr and exit status 130, never a traceback, never a crash.

A ``KeyboardInterrupt`` raised inside jax (``backend.compile_and_load``, a running XLA computation) unwinds
through frames that print 20-80 lines, and the interpreter's teardown while XLA's threads still work has
crashed the process (status 139). So the CLI does not let the interrupt unwind: :func:`exit_on_interrupt`
installs a SIGINT handler that writes ``kvhoist <command>: interrupted`` and ends the process with
``os._exit(130)`` (stdout flushed first, no interpreter teardown).

A Python signal handler runs only when the main thread returns to Python, which a long XLA compile does not
do for minutes. Python's C-level handler also writes the signal number to :func:`signal.set_wakeup_fd`'s
pipe; a daemon thread waits on that pipe and exits the process from there while the main thread is still
inside XLA (which releases the GIL), so Ctrl-C acts at once.

Example:
    >>> exit_on_interrupt("demo")     # first thing a command does
"""

from __future__ import annotations

import os
import signal
import sys
import threading

__all__ = ["EXIT_INTERRUPTED", "exit_on_interrupt"]

#: 128 + SIGINT, what a shell reports for a process ended by Ctrl-C.
EXIT_INTERRUPTED = 130

_message = b"kvhoist: interrupted\n"
_installed = False
#: where the line goes: the terminal's stderr, also while fd 2 is redirected (``kvhoist.tools.tpu.native_stderr``).
stderr_fd = 2


def _exit_now(*_: object) -> None:
    """Write the line, flush stdout, end the process without interpreter teardown."""
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - a closed pipe, a stdout lock held by the main thread: exit anyway
        pass
    try:
        os.write(stderr_fd, _message)
    except OSError:
        pass
    os._exit(EXIT_INTERRUPTED)


def _watch(fd: int) -> None:
    while True:
        try:
            data = os.read(fd, 64)
        except OSError:
            return
        if not data:
            return
        if signal.SIGINT in data:
            _exit_now()


def exit_on_interrupt(command: str) -> None:
    """From now on SIGINT (Ctrl-C) prints ``kvhoist <command>: interrupted`` and exits 130 at once.

    Call from the main thread (signal handlers can only be set there); a second call only renames the
    command. Does nothing when SIGINT is ignored (a background job started with ``nohup``/``&``)."""
    global _message, _installed
    prefix = "\n" if _is_terminal() else ""
    _message = f"{prefix}kvhoist{' ' + command if command else ''}: interrupted\n".encode()
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.signal(signal.SIGINT, _exit_now)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(read_fd,), name="kvhoist-interrupt", daemon=True).start()
    _installed = True


def _is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
