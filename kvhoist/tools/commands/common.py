"""What every SPEC command shares: the sampler options from the parsed arguments, the resolved program, and
one-line errors for output files that fail while being written."""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import Any, Iterator

__all__ = ["sampler_options", "program", "use_color", "writing"]


def sampler_options(args: argparse.Namespace) -> Any:
    """The :class:`kvhoist.tools.specs.SamplerOptions` of a SPEC command's parsed arguments."""
    from kvhoist.tools.specs import SamplerOptions

    return SamplerOptions(loop=args.loop, scan_layers=args.scan_layers, cfg=args.cfg, steps=args.steps,
                          height=args.height, width=args.width, frames=args.frames, scheduler=args.scheduler,
                          target=args.target, dtype=args.dtype, attention=getattr(args, "attention", None))


def program(args: argparse.Namespace) -> Any:
    """``args.spec`` resolved with the command's options (:func:`kvhoist.tools.specs.resolve`)."""
    from kvhoist.tools.specs import resolve

    return resolve(args.spec, sampler_options(args))


def use_color(flag: bool | None, stream: Any) -> bool:
    """``--color`` / ``--no-color``, else colour on a terminal unless ``NO_COLOR`` is set."""
    if flag is not None:
        return flag
    return stream.isatty() and not os.environ.get("NO_COLOR")


@contextlib.contextmanager
def writing(option: str, path: str) -> Iterator[None]:
    """Turn an ``OSError`` while writing ``path`` (a disk that filled up, a folder removed since the
    early check) into the one-line usage error of the CLI."""
    from kvhoist.tools.specs import SpecError

    try:
        yield
    except OSError as err:
        raise SpecError(f"{option} {path}: cannot write: {err.strerror or err}") from None
