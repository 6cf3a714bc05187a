"""Shared fixtures: one run per installed backend, hypothesis profiles, tolerances."""

from __future__ import annotations

import os

import pytest
from _pytest.doctest import DoctestItem as _DoctestItem
from hypothesis import HealthCheck, settings

import tensormoe

# Hypothesis profiles.  "ci" is the default: a stated number of examples per test,
# no deadline (JAX compiles each new shape once, which a deadline would count).
settings.register_profile(
    "ci",
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,
)
settings.register_profile(
    "dev",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

from helpers import BACKENDS


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the test inside ``backend_context`` of each installed backend."""
    with tensormoe.backend_context(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _doctest_backend(request):
    """Doctests run on NumPy, whatever TENSORMOE_BACKEND says."""
    if isinstance(request.node, _DoctestItem):
        with tensormoe.backend_context("numpy"):
            yield
    else:
        yield
