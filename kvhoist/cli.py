"""The ``kvhoist`` command line (placeholder until the CLI lands)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("usage: kvhoist {demo,diff,report,graph,bench} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
