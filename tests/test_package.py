"""The package's surface: submodules as lazy attributes, the files a user looks for first."""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import subprocess
import sys

import pytest

import tensormoe

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_io_is_an_attribute_after_import_and_imports_no_framework():
    code = (
        "import sys, tensormoe\n"
        "assert 'io' in dir(tensormoe)\n"
        "load = tensormoe.io.load\n"
        "assert load.__module__ == 'tensormoe.tools.io', load.__module__\n"
        "assert tensormoe.numerics.__name__ == 'tensormoe.numerics'\n"
        "assert 'torch' not in sys.modules and 'jax' not in sys.modules, sorted(sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TENSORMOE_BACKEND": "numpy"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr


def test_unknown_attributes_still_raise_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        tensormoe.nope  # noqa: B018
    assert not hasattr(tensormoe, "Io")


def test_licence_changelog_and_citation_exist_and_agree_with_pyproject():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'license = "MIT"' in pyproject and 'license-files = ["LICENSE"]' in pyproject
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    version = tensormoe.__version__
    # one home for the version: tensormoe/_version.py, which pyproject.toml reads
    assert 'dynamic = ["version"' in pyproject and 'version = { attr = "tensormoe._version.__version__" }' in pyproject
    assert importlib.metadata.version("tensormoe") == version  # the installed metadata agrees
    assert f"version: {version}" in (ROOT / "CITATION.cff").read_text()
    assert f"## {version}" in (ROOT / "CHANGELOG.md").read_text()
