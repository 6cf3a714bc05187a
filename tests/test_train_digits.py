"""The digits example runs on every backend (--quick), learns, and writes its specialisation plot."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
from helpers import BACKENDS

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
if not {"pytorch", "jax"} & set(BACKENDS):
    pytest.skip("the example trains with PyTorch or JAX", allow_module_level=True)

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"


def load_example():
    if "train_digits" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["train_digits"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["train_digits"]


def test_quick_run_on_every_backend(tmp_path):
    example = load_example()
    results = {}
    for backend in BACKENDS:
        plot = tmp_path / f"{backend}.png"
        out = example.main(["--quick", "--quiet", "--backend", backend, "--plot", str(plot), "--save", str(tmp_path)])
        results[backend] = out
        assert out["backend"] == backend
        # 3 epochs already separate ten classes far above chance (0.1)
        assert out["mmoe"]["accuracy"][0] > 0.8 and out["linear"]["accuracy"][0] > 0.8, out
        # parameter-matched: the MMoE hidden layer (gates included) fits the linear layer's budget
        assert out["mmoe"]["params"][0] <= out["linear"]["params"][0]
        assert 0.1 <= out["mmoe"]["specialisation"][0] <= 1.0
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if {"numpy", "pytorch"} <= set(results):
        # NumPy serves the PyTorch-trained model from its saved weights: same predictions
        assert abs(results["numpy"]["mmoe"]["accuracy"][0] - results["pytorch"]["mmoe"]["accuracy"][0]) < 1e-9
        assert (tmp_path / "hidden.npz").exists()


def test_class_mass_shares():
    import numpy as np

    example = load_example()
    coefficients = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 1.0, 0.0]])
    labels = np.array([0, 1, 1])
    mass, used = example.class_mass(coefficients, labels)
    np.testing.assert_allclose(mass[:2], [[2 / 3, 0, 0], [1 / 3, 1, 0]])
    assert used.tolist() == [True, True, False]
    assert example.specialisation(mass, used) == pytest.approx((2 / 3 + 1) / 2)
