"""Helpers for tests on several CPU devices: a child process's environment, a child that prints JSON, meshes.

A test that needs N devices on a CPU host runs itself (or a copy per JAX process) as a child with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``: the flag must be set before jax starts, so the
parent, which pytest has already given one device, cannot. tests/compiler/test_jit_twin.py and
tests/compiler/test_multiprocess.py use these.

Example:
    >>> facts = run_json_child(__file__, devices=8, timeout=600)   # the child prints one JSON line last
    >>> mesh = make_mesh({"data": 2, "model": 4}, "Explicit")       # in the child
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

#: The repository root (the children's working directory; on their PYTHONPATH with tests/).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def cpu_devices_env(devices: int) -> dict[str, str]:
    """This process's environment for a child with ``devices`` CPU devices.

    Args:
      devices: the child's local device count (any device-count flag already in ``XLA_FLAGS`` is replaced).

    Returns:
      The environment: ``XLA_FLAGS`` with the device count, ``JAX_PLATFORMS=cpu``, and the repository
      root and ``tests/`` in front of ``PYTHONPATH`` (so the child imports this checkout and these helpers).
    """
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT_FLAG)]
    env["XLA_FLAGS"] = " ".join(flags + [f"{_DEVICE_COUNT_FLAG}={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), env.get("PYTHONPATH", "")])
    return env


def run_json_child(script: str, *, devices: int, timeout: float, args: tuple[str, ...] = ()) -> Any:
    """Run ``python script *args`` with ``devices`` CPU devices; return the JSON of its last stdout line.

    Args:
      script: the file to run (usually the test module itself, whose ``__main__`` prints the facts).
      devices: the child's CPU device count (:func:`cpu_devices_env`).
      timeout: seconds before the child is killed (``subprocess.TimeoutExpired``).
      args: command-line arguments after the script.

    Returns:
      The decoded last line of the child's stdout; the test fails with the child's stderr when it exits
      with an error.
    """
    proc = subprocess.run([sys.executable, os.path.abspath(script), *args], env=cpu_devices_env(devices),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        pytest.fail(f"child process {os.path.basename(script)} failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_mesh(axes: dict[str, int], axis_type: str = "Auto") -> Any:
    """``jax.make_mesh`` over ``axes`` (name -> size, in order), every axis of one type.

    Args:
      axes: the mesh's axis names and sizes, e.g. ``{"data": 2, "model": 4}``.
      axis_type: ``"Auto"``, ``"Explicit"`` or ``"Manual"`` (a ``jax.sharding.AxisType`` member's name).

    Returns:
      The mesh.
    """
    import jax
    from jax.sharding import AxisType

    if not hasattr(AxisType, axis_type):
        raise ValueError(f"axis_type must be one of Auto, Explicit, Manual; got {axis_type!r}")
    return jax.make_mesh(tuple(axes.values()), tuple(axes), axis_types=(getattr(AxisType, axis_type),) * len(axes))
