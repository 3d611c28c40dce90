"""kvhoist.contract: the numerical contract every hoisted-vs-jit comparison asserts (docs/design.md §5)."""

from __future__ import annotations

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvhoist import contract


def test_docstring_example_and_its_output():
    result = doctest.testmod(contract, raise_on_error=False, verbose=False)
    assert result.attempted >= 3 and result.failed == 0, result


def test_bound_is_normwise_per_dtype():
    want = np.float32([1e-3, -50.0, 2.0])
    assert contract.bound(want) == pytest.approx(contract.RTOL["float32"] * 50.0)
    # A small element may move by much more than its own relative precision: the sum's scale bounds it.
    contract.assert_close(np.float32([1e-3 + 5e-4, -50.0, 2.0]), want)
    with pytest.raises(AssertionError, match=r"float32 bound 2e-05 x max \|want\| 50"):
        contract.assert_close(np.float32([1e-3, -50.0 + 2e-3, 2.0]), want)
    bf = jnp.asarray([1.0, 2.0], jnp.bfloat16)
    contract.assert_close(bf + jnp.asarray([0.0, 0.0625], jnp.bfloat16), bf)   # 4 ulps at 2.0 in bfloat16
    with pytest.raises(AssertionError):
        contract.assert_close(bf + jnp.asarray([0.0, 0.25], jnp.bfloat16), bf)


def test_exact_kinds_and_structure():
    contract.assert_close({"t": np.int32([1, 2]), "b": np.bool_([True])}, {"t": np.int32([1, 2]), "b": np.bool_([True])})
    assert contract.violations(np.int32([1, 2]), np.int32([1, 3])) == [
        "[]: 1 of 2 elements differ (exact dtype int32)"]
    assert contract.violations(np.float32([1.0]), np.float64([1.0]))[0].startswith("[]: float32[1] != float64[1]")
    assert "pytrees differ" in contract.violations((np.float32(1),), [np.float32(1)])[0]
    k = jax.random.key(0)
    contract.assert_close(k, jax.random.key(0))
    assert contract.violations(k, jax.random.key(1))


def test_non_finite_values_must_match_in_place():
    want = np.float32([np.nan, np.inf, 1.0])
    contract.assert_close(np.float32([np.nan, np.inf, 1.0]), want)
    for got in ([1.0, np.inf, 1.0], [np.nan, -np.inf, 1.0], [np.nan, np.inf, np.nan]):
        assert "non-finite" in contract.violations(np.float32(got), want)[0], got
    # All non-finite: nothing else to compare.
    contract.assert_close(np.float32([np.nan]), np.float32([np.nan]))


def test_identical_is_bitwise():
    contract.assert_identical({"a": np.float32([1.0, np.nan])}, {"a": np.float32([1.0, np.nan])})
    with pytest.raises(AssertionError):
        contract.assert_identical(np.float32([1.0]), np.float32([np.nextafter(np.float32(1), np.float32(2))]))
