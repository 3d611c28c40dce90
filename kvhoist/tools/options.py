"""Option values of the command line, checked by the parser (argparse ``type=``) before any work starts: a bad
value is a usage error (the command's usage and one ``error:`` line, exit 2).

Shared by :mod:`kvhoist.tools.cli` and the benchmarks' options (:mod:`kvhoist.bench.command`).
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Callable

__all__ = ["int_at_least", "check_output_path", "output_file", "input_file", "mesh_shape"]


def int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse ``type=``: an integer >= ``minimum``; ``what`` names the allowed range in the error
    (e.g. ``int_at_least(1, "a positive integer")`` turns ``--steps 0`` into ``argument --steps: must be
    a positive integer, got 0``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    parse.__name__ = f"int>={minimum}"
    return parse


def check_output_path(option: str, path: str) -> str | None:
    """Why ``path`` (the value of ``option``) cannot be written, in one line, or None if it can.

    Checked before any work starts, so that a typo in ``--out`` does not cost a trace of a 14B sampler.
    """
    if not path:
        return f"{option}: empty file name"
    if os.path.isdir(path):
        return f"{option} {path}: is a directory; give a file name"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        what = "is not a directory" if os.path.exists(folder) else "does not exist"
        return f"{option} {path}: folder {folder} {what}"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{option} {path}: folder {folder} is not writable"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f"{option} {path}: file exists and is not writable"
    return None


def output_file(option: str) -> Callable[[str], str]:
    """An argparse ``type=`` for an output file: :func:`check_output_path` at parse time, so a bad path
    is a usage error (the subcommand's usage, exit 2) before any work starts."""

    def parse(path: str) -> str:
        why = check_output_path(option, path)
        if why:
            raise argparse.ArgumentTypeError(why.removeprefix(f"{option} "))
        return path

    parse.__name__ = "output file"
    return parse


def input_file(path: str) -> str:
    """An argparse ``type=`` for a file that must exist and be readable."""
    if not os.path.exists(path):
        raise argparse.ArgumentTypeError(f"{path}: no such file")
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path}: is a directory; give a file name")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{path}: not readable")
    return path


def mesh_shape(text: str) -> tuple[int, int]:
    """An argparse ``type=`` for ``--mesh``: ``DATAxTENSOR`` with two positive integers, e.g. ``1x8``."""
    m = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise argparse.ArgumentTypeError(f"must be DATAxTENSOR with positive integers (e.g. 1x8), got {text!r}")
    return int(m.group(1)), int(m.group(2))
