"""Shared fixtures for the kernel tests.

float64: the gradient checks need it, but ``jax_enable_x64`` set with
``jax.config.update`` is process-global and would silently change the dtypes
every other test sees. JAX 0.10 ships ``jax.enable_x64`` as a context manager
(the old ``jax.experimental.enable_x64`` is gone), so a test that needs float64
asks for the ``x64`` fixture, which turns it on for that test only. Tests that
run under hypothesis (whose health check forbids function-scoped fixtures) use
``with jax.enable_x64(True):`` directly. Every other test states its dtypes
explicitly, so it also passes if some other module turns x64 on globally.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest


@pytest.fixture
def x64():
    """Enable 64-bit JAX types for the duration of one test."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def rng():
    """A fresh, seeded numpy generator: every test sees the same numbers."""
    return np.random.default_rng(0)
