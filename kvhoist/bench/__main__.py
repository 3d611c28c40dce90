"""``python -m kvhoist.bench``: the sampler benchmark, as ``kvhoist bench``."""

import sys

from kvhoist.bench.command import run_as_module

sys.exit(run_as_module())
