"""Every factorized forward equals the dense forward through the reconstructed tensor.

Each property runs with two parameter sets (``helpers.parameter_sets``): the initialisation with random
gates, and every parameter random.  The initial TT/TR expert cores are ``eye(r) * c`` and later levels
all ones, symmetric in their bonds, so only the random set sees a transposed core or a ring closed on
the wrong bond.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import BACKENDS, parameter_sets, random_gates, rounding_tolerance, to_numpy
from hypothesis import given
from hypothesis import strategies as st

import tensormoe
from tensormoe.ops import get_ops

LAYERS = {
    "cp": lambda i, o, e, r, **kw: tensormoe.CPMMoE(i, o, e, rank=r, **kw),
    "tucker": lambda i, o, e, r, **kw: tensormoe.TuckerMMoE(i, o, e, ranks=r, **kw),
    "tt": lambda i, o, e, r, **kw: tensormoe.TTMMoE(i, o, e, ranks=r, **kw),
    "tr": lambda i, o, e, r, **kw: tensormoe.TRMMoE(i, o, e, ranks=r, **kw),
}


@st.composite
def layer_configs(draw):
    """Random layers: factorization, 1-3 expert levels, dims, ranks, batch shape, gate, bias."""
    kind = draw(st.sampled_from(sorted(LAYERS)))
    levels = draw(st.integers(1, 3))
    expert_dims = draw(st.lists(st.integers(1, 5), min_size=levels, max_size=levels))
    in_dim, out_dim = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    if kind == "tucker":
        rank = draw(st.one_of(st.integers(1, 4), st.just(None)))
        if rank is None:  # explicit per-mode ranks within each mode's size
            dims = [*expert_dims, in_dim + 1, out_dim]
            rank = [draw(st.integers(1, d)) for d in dims]
    else:
        rank = draw(st.integers(1, 4))
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    return {
        "kind": kind,
        "in_dim": in_dim,
        "out_dim": out_dim,
        "expert_dims": expert_dims,
        "rank": rank,
        "batch": batch,
        "bias": True if kind == "tucker" and isinstance(rank, list) else draw(st.booleans()),
        "gate": draw(st.sampled_from(["entmax15", "softmax", "sparsemax"])),
        "seed": draw(st.integers(0, 2**16)),
    }


def build(cfg, dtype="float32"):
    return LAYERS[cfg["kind"]](
        cfg["in_dim"], cfg["out_dim"], cfg["expert_dims"], cfg["rank"], bias=cfg["bias"], gate=cfg["gate"],
        seed=cfg["seed"], dtype=dtype,
    )




@given(cfg=layer_configs())
def test_factorized_forward_equals_dense_forward(backend, cfg):
    layer = build(cfg)
    ops = get_ops()
    x_np = np.random.default_rng(cfg["seed"] + 1).normal(size=(*cfg["batch"], cfg["in_dim"]))
    x = ops.asarray(x_np, "float32")
    for fill, params in parameter_sets(layer, cfg["seed"]).items():
        y = layer.apply(params, x)
        y_dense = layer.dense_forward(params, x)
        assert tuple(y.shape) == (*cfg["batch"], cfg["out_dim"])
        coeffs = [to_numpy(a) for a in layer.coefficients(params, x)]
        params_np = {k: to_numpy(v) for k, v in params.items()}
        tol = rounding_tolerance(layer, params_np, to_numpy(x).reshape(-1, cfg["in_dim"]),
                                 [a.reshape(-1, a.shape[-1]) for a in coeffs])
        err = np.abs(to_numpy(y) - to_numpy(y_dense)).reshape(tol.shape)
        assert np.all(err <= tol), f"{fill}: max error {err.max()} above bound {tol[err > tol].min()}"


@given(cfg=layer_configs())
def test_float64_factorized_equals_dense_and_float32(cfg):
    """NumPy and PyTorch in float64: the rounding bound shrinks with eps (JAX runs in float32 unless x64 is on)."""
    for name in [b for b in BACKENDS if b != "jax"]:
        with tensormoe.backend_context(name):
            layer = build(cfg, "float64")
            ops = get_ops()
            x = ops.asarray(np.random.default_rng(cfg["seed"]).normal(size=(*cfg["batch"], cfg["in_dim"])), "float64")
            for fill, params in parameter_sets(layer, cfg["seed"]).items():
                y, y_dense = to_numpy(layer.apply(params, x)), to_numpy(layer.dense_forward(params, x))
                coeffs = [to_numpy(a).reshape(-1, n) for a, n in zip(layer.coefficients(params, x), layer.expert_dims)]
                tol = rounding_tolerance(layer, {k: to_numpy(v) for k, v in params.items()},
                                         to_numpy(x).reshape(-1, cfg["in_dim"]), coeffs, "float64")
                assert np.all(np.abs(y - y_dense).reshape(tol.shape) <= tol), (name, fill)


@given(cfg=layer_configs())
def test_same_weights_same_outputs_on_every_backend(cfg):
    x_np = np.random.default_rng(cfg["seed"]).normal(size=(*cfg["batch"], cfg["in_dim"]))
    outputs = {"init": {}, "random": {}}
    for name in BACKENDS:
        with tensormoe.backend_context(name):
            layer = build(cfg)  # one layer per backend: JAX compiles its forward once
            x = get_ops().asarray(x_np, "float32")
            for fill, params in parameter_sets(layer, cfg["seed"]).items():
                outputs[fill][name] = to_numpy(layer.apply(params, x))
                if name == "numpy":
                    coeffs = [to_numpy(a).reshape(-1, n) for a, n in zip(layer.coefficients(params, x), layer.expert_dims)]
                    outputs[fill]["tol"] = rounding_tolerance(
                        layer, {k: to_numpy(v) for k, v in params.items()},
                        x_np.astype(np.float32).astype(np.float64).reshape(-1, cfg["in_dim"]), coeffs)
    for fill, results in outputs.items():
        tol, base = results.pop("tol"), results["numpy"]
        for name, y in results.items():
            # gates can round differently too; bound the coefficient rounding by a few eps on top
            assert np.all(np.abs(y - base).reshape(tol.shape) <= 4 * tol + 1e-5 * np.abs(base).max()), (name, fill)


@given(cfg=layer_configs(), data=st.data(), fill=st.sampled_from(["init", "random"]))
def test_expert_slice_equals_slice_of_dense_tensor(backend, cfg, data, fill):
    layer = build(cfg)
    index = tuple(data.draw(st.integers(0, n - 1)) for n in layer.expert_dims)
    params = parameter_sets(layer, cfg["seed"])[fill]
    dense = to_numpy(layer.dense_weight(params))
    sliced = to_numpy(layer.expert_weight(params, index))
    assert sliced.shape == (cfg["in_dim"] + cfg["bias"], cfg["out_dim"])
    np.testing.assert_allclose(sliced, dense[index], rtol=1e-5, atol=1e-6 * np.abs(dense).max(), err_msg=fill)


@given(cfg=layer_configs(), fill=st.sampled_from(["init", "random"]))
def test_given_coefficients_are_used(backend, cfg, fill):
    """Supplying coefficients replaces the gates: one-hot coefficients select one expert's matrix."""
    layer = build(cfg)
    ops = get_ops()
    x_np = np.random.default_rng(cfg["seed"]).normal(size=(*cfg["batch"], cfg["in_dim"]))
    x = ops.asarray(x_np, "float32")
    onehot = [np.zeros((*cfg["batch"], n)) for n in layer.expert_dims]
    for a in onehot:
        a[..., -1] = 1.0
    xin = np.concatenate([x_np, np.ones((*cfg["batch"], 1))], -1) if cfg["bias"] else x_np
    params = parameter_sets(layer, cfg["seed"])[fill]
    y = to_numpy(layer.apply(params, x, coefficients=[ops.asarray(a, "float32") for a in onehot]))
    w = to_numpy(layer.expert_weight(params, tuple(n - 1 for n in layer.expert_dims)))
    scale = np.abs(xin).max() * np.abs(w).sum(0).max() + 1
    np.testing.assert_allclose(y, xin @ w, rtol=1e-4, atol=1e-5 * scale, err_msg=fill)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_initial_std_of_reconstructed_tensor(kind):
    """init_std controls the std of the entries of W (averaged over seeds: entries share factors)."""
    ranks = {"cp": 16, "tucker": [4, 8, 8], "tt": 8, "tr": 6}[kind]
    stds = []
    for seed in range(6):
        layer = LAYERS[kind](48, 40, [24], ranks, init_std=0.05,
                             seed=seed, dtype="float64")
        stds.append(float(np.std(layer.dense_weight())))
    assert 0.04 < np.sqrt(np.mean(np.square(stds))) < 0.06


def test_gates_start_uniform(backend):
    layer = tensormoe.CPMMoE(6, 3, [4, 5], rank=2)
    x = get_ops().asarray(np.random.default_rng(0).normal(size=(3, 6)), "float32")
    for a, n in zip(layer.coefficients(None, x), [4, 5]):
        np.testing.assert_allclose(to_numpy(a), np.full((3, n), 1 / n), rtol=1e-6)


def test_layer_params_follow_the_backend_flag():
    """One layer, the flag switched: the same numbers on every backend (params converted once)."""
    layer = tensormoe.TRMMoE(5, 4, [3, 2], ranks=2)
    x = np.random.default_rng(0).normal(size=(2, 5)).astype("float32")
    params = random_gates(layer, 0)
    layer.params = params
    ref = to_numpy(layer(x))
    for name in BACKENDS:
        with tensormoe.backend_context(name):
            np.testing.assert_allclose(to_numpy(layer(get_ops().asarray(x))), ref, rtol=1e-5, atol=1e-6)


def test_forward_reuses_one_plan(backend):
    from tensormoe import contraction

    layer = tensormoe.CPMMoE(6, 3, [4], rank=2)
    x = get_ops().asarray(np.ones((5, 6)), "float32")
    layer(x)
    before = contraction.cache_info()
    for _ in range(3):
        layer(x)
    after = contraction.cache_info()
    assert after["misses"] == before["misses"]  # no new path search
    if backend != "jax":  # under jax.jit the compiled program does not even look the plan up
        assert after["hits"] == before["hits"] + 3


@pytest.mark.parametrize("kind", ["tt", "tr"])
def test_random_parameters_see_every_bond(kind):
    """Why the properties also run with random parameters: at init, expert cores are symmetric in their bonds.

    Swapping the two bond axes of an expert core (what a transposed core in the forward would compute)
    leaves the initial tensor unchanged, but changes the tensor of random parameters.
    """
    with tensormoe.backend_context("numpy"):
        layer = LAYERS[kind](3, 2, [3, 2], 2, dtype="float64")
        for fill, params in parameter_sets(layer, 0).items():
            for k in range(layer.hierarchy):
                if layer.factorization.bonds[k] != layer.factorization.bonds[k + 1]:
                    continue  # a TT's first core is [1, N, r]: a transposed one has another shape
                swapped = {**params, f"factor_{k}": np.swapaxes(params[f"factor_{k}"], 0, 2)}
                same = np.allclose(layer.dense_weight(swapped), layer.dense_weight(params))
                assert same == (fill == "init"), (fill, k)


# -- layers built without parameters ---------------------------------------------------


@pytest.mark.parametrize("kind", ["cp", "tucker", "tt", "tr"])
def test_a_layer_built_without_parameters_runs_once_given_them(kind, backend):
    """init=False draws nothing; the parameters assigned afterwards give the forward of a drawn layer."""
    from helpers import random_params

    from tensormoe.layers import make_layer

    drawn = make_layer(kind, 4, 3, [5, 2], 2, router=["top2", "entmax15"], seed=3)
    empty = make_layer(kind, 4, 3, [5, 2], 2, router=["top2", "entmax15"], seed=3, init=False)
    assert empty.params == {} and empty.param_shapes() == drawn.param_shapes()
    assert empty.n_params == drawn.n_params
    x = get_ops().asarray(np.random.default_rng(0).normal(size=(6, 4)), "float32")
    with pytest.raises(ValueError, match="init=False"):
        empty(x)
    params = random_params(drawn, 7)
    empty.params = params
    np.testing.assert_array_equal(to_numpy(empty(x)), to_numpy(drawn.apply(params, x)))


def test_loading_a_file_draws_no_parameters(tmp_path, monkeypatch):
    """tensormoe.io.layer_from_file builds the layer with init=False: the drawing code never runs."""
    from tensormoe.tools import io
    from tensormoe.layers import mmoe

    layer = tensormoe.TTMMoE(4, 3, [5], ranks=2, router="top1", seed=2)
    path = str(tmp_path / "w.safetensors")
    io.save(layer, path)

    def refuse(*args, **kwargs):
        raise AssertionError("layer_from_file drew parameters")

    monkeypatch.setattr(mmoe, "init_params", refuse)
    loaded = io.layer_from_file(path, backend="numpy")
    for name, value in layer.params.items():
        np.testing.assert_array_equal(loaded.params[name], value)


def test_parameter_counts_include_every_router_parameter():
    """n_params counts top-k's gate_noise and Soft MoE's [I, S] gate, from the routers' own shapes."""
    from tensormoe.routing import SoftRouter, TopKRouter

    rng = np.random.default_rng(4)
    for _ in range(5):
        in_dim, out_dim, n, rank, slots = (int(v) for v in rng.integers(1, 7, size=5))
        base = tensormoe.CPMMoE(in_dim, out_dim, [n], rank=rank, gate_norm=None)
        factors = rank * (n + in_dim + 1 + out_dim)
        assert base.n_params == factors + in_dim * n
        top = tensormoe.CPMMoE(in_dim, out_dim, [n], rank=rank, router=TopKRouter(k=1))
        assert top.n_params == factors + 2 * in_dim * n
        soft = tensormoe.CPMMoE(in_dim, out_dim, [n], rank=rank, router=SoftRouter(slots_per_expert=slots))
        assert soft.n_params == factors + in_dim * n * slots
