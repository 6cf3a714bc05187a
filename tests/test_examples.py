"""The example scripts: the demo on every backend, --help with usage examples, bad arguments as one argparse line."""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys

import numpy as np
import pytest
from helpers import BACKENDS

import tensormoe

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    """Import ``examples/<name>.py`` as a module (once)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


SMALL = ["--experts", "8", "--rank", "4", "--dim", "16", "--batch", "5", "--repeats", "3"]


def test_demo_prints_the_same_output_on_every_backend_and_times_a_linear_layer(capsys):
    demo = load("demo")
    outputs = {}
    for backend in BACKENDS:
        with tensormoe.backend_context(backend):
            result = demo.main(SMALL)
        out = capsys.readouterr().out
        assert result["backend"] == backend and f"backend            {backend}" in out
        assert result["layer_s"] > 0 and result["linear_s"] > 0
        assert f"{result['ratio']:.1f}x the linear layer's time" in out
        assert "median of 3 calls" in out
        outputs[backend] = result["output"]
    # the demo's layer, recomputed independently: the dense reference through the reconstructed W on NumPy
    with tensormoe.backend_context("numpy"):
        layer = tensormoe.CPMMoE(16, 16, expert_dims=[8], rank=4, seed=0)
        rng = np.random.default_rng(1)
        params = {**layer.params, "gate_0": rng.normal(size=(16, 8)).astype(np.float32)}
        x = rng.normal(size=(5, 16)).astype(np.float32)
        expected = np.asarray(layer.dense_forward(params, x), dtype=np.float64)
    for backend, y in outputs.items():
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5, err_msg=backend)


def test_median_times_calls_the_functions_in_turn():
    demo = load("demo")
    calls = []
    medians = demo.median_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b"] * 3 and set(medians) == {"a", "b"} and min(medians.values()) >= 0


def _options_without_help(parser: argparse.ArgumentParser) -> list[str]:
    return [a.dest for a in parser._actions if not (a.help or "").strip()]


@pytest.mark.parametrize("name", ["demo", "train_digits", "compare_routers", "choose_factorization"])
def test_help_has_usage_examples_and_describes_every_option(name, capsys):
    pytest.importorskip("tqdm")
    module = load(name)
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "\nexamples:\n  python examples/" in out and "output" in out
    assert _options_without_help(module.parser()) == []


@pytest.mark.parametrize(
    ("name", "argv", "message"),
    [
        ("demo", ["--rank", "0"], "argument --rank: expected a positive integer; got '0'"),
        ("demo", ["--repeats", "many"], "argument --repeats: expected a positive integer"),
        ("train_digits", ["--backend", "tf"], "argument --backend: invalid choice: 'tf'"),
        ("train_digits", ["--kind", "svd"], "argument --kind: invalid choice: 'svd'"),
        ("train_digits", ["--epochs", "-1"], "argument --epochs: expected a positive integer; got '-1'"),
        ("train_digits", ["--lr", "nan"], "argument --lr: expected a number > 0; got 'nan'"),
        ("train_digits", ["--save", "/nonexistent/folder"], "argument --save: '/nonexistent/folder' is not a folder"),
        ("compare_routers", ["--routers", "top3"], "argument --routers: invalid choice: 'top3'"),
        ("compare_routers", ["--lr", "0"], "argument --lr: expected a number > 0; got '0'"),
        ("compare_routers", ["--z-loss", "-1"], "argument --z-loss: expected a number >= 0; got '-1'"),
        ("compare_routers", ["--experts", "4", "x"], "argument --experts: expected a positive integer; got 'x'"),
        ("compare_routers", ["--budget", "10"], "argument --budget: 10 parameters are too few for router"),
        ("compare_routers", ["--routers", "product_keys", "--experts", "8"],
         "argument --experts: product_keys needs a square number of experts"),
        ("choose_factorization", ["--kinds", "cp,svd"], "argument --kinds: expected a comma-separated subset"),
        ("choose_factorization", ["--budget", "3"], "argument --budget:"),
    ],
)
def test_bad_arguments_end_in_one_argparse_error_line(name, argv, message, capsys):
    pytest.importorskip("tqdm")
    if name in ("train_digits", "compare_routers"):
        pytest.importorskip("sklearn")
    if name == "compare_routers":
        pytest.importorskip("torch")
    if name == "train_digits" and not {"pytorch", "jax"} & set(BACKENDS):
        pytest.skip("train_digits needs PyTorch or JAX")
    with pytest.raises(SystemExit) as done:
        load(name).main(argv)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert ": error: " in last and message in last, err


def test_router_plot_error_bars_stay_in_range():
    routers = load("compare_routers")
    values, stds = np.array([0.02, 0.5, 0.99]), np.array([0.05, 0.1, 0.05])
    low, high = routers._clipped_errors(values, stds, 0.0, 1.0)
    np.testing.assert_allclose(low, [0.02, 0.1, 0.05])
    np.testing.assert_allclose(high, [0.05, 0.1, 0.01])
    assert np.all(values - low >= 0) and np.all(values + high <= 1)


def test_every_router_label_builds_a_router():
    routers = load("compare_routers")
    from tensormoe.routers import get_router

    for label in routers.ROUTERS:
        for levels in (1, 2):
            router = routers.make_router(label, levels)
            for r in router if isinstance(router, list) else [router]:
                get_router(r)  # a name get_router knows, or a Router


def test_choose_factorization_times_every_kind_within_the_budget(capsys):
    example = load("choose_factorization")
    rows = example.main(["--in", "12", "--out", "10", "--experts", "4", "--repeats", "2", "--batch", "3"])
    out = capsys.readouterr().out
    assert [r["kind"] for r in rows] == ["cp", "tucker", "tt", "tr"]
    budget = (12 + 1) * 10
    for row in rows:
        assert 0 < row["params"] <= budget and row["ms"] > 0
        assert f"| {row['kind']} | {row['ranks']} | {row['params']:,} |" in out
    assert f"| linear | - | {budget:,} | 1.00 |" in out


def test_compare_routers_peer_row_on_the_product_key_grid_within_the_budget(capsys):
    for module in ("torch", "sklearn", "tqdm", "PEER_pytorch"):
        pytest.importorskip(module)
    import torch

    routers = load("compare_routers")
    rows = routers.main(["--routers", "peer", "--quick", "--plot", "", "--quiet"])
    out = capsys.readouterr().out
    assert [r["router"] for r in rows] == ["peer"]
    peer = rows[0]
    # 16 experts as PEER's 4 x 4 grid, width 32 (16 inputs zero-padded), the largest dim_key within 2048
    assert peer["params"] == routers.peer_params(32, 16, 14) <= 2048 < routers.peer_params(32, 16, 15)
    assert peer["rank"] == "dk=14" and f"| peer | dk=14 | {peer['params']:,} |" in out
    assert peer["active"] == 2.0 and 0.0 <= peer["entropy"] <= 1.0 + 1e-9 and 0.0 <= peer["accuracy"] <= 1.0
    # the usage weights are PEER's own: its output recomputed from them and its expert embeddings
    model = routers.PeerModel(16, 32, [4, 4], 2048, seed=0)
    x = torch.randn(3, 8, 16)
    with torch.no_grad():
        h, _ = model.forward(x, training=False)
        w = model.routing(x)
        layer = model.layer
        xp = model._pad(x).reshape(-1, model.d)
        hidden = torch.nn.functional.gelu(xp @ layer.weight_down_embed.weight.T)
        expected = ((w * hidden) @ layer.weight_up_embed.weight)[:, :32].reshape(3, 8, 32)
    torch.testing.assert_close(h, expected, rtol=1e-5, atol=1e-5)


def test_compare_routers_peer_without_PEER_pytorch_is_left_out_with_a_note(monkeypatch, capsys):
    for module in ("torch", "sklearn", "tqdm"):
        pytest.importorskip(module)
    monkeypatch.setitem(sys.modules, "PEER_pytorch", None)  # an import of it raises ImportError
    rows = load("compare_routers").main(["--routers", "peer", "--quick", "--plot", "", "--quiet"])
    err = capsys.readouterr().err
    assert rows == [] and "Traceback" not in err
    assert "note: peer left out: PEER_pytorch is not installed" in err and "pip install PEER-pytorch" in err
