"""Gradients through the factorized contraction equal gradients through the dense weight tensor.

The reference is :meth:`MMoE.dense_forward` (the dense ``W`` rebuilt by TensorLy, then one
einsum), differentiated by the same framework.  The loss is ``sum(r * y)`` for a random
``r``, so every gradient is itself a multilinear contraction; its rounding error is bounded
like the forward's (``helpers.rounding_tolerance``): a few ``eps`` times the same contraction
over absolute values, computed here in float64 from the network's equation.  Finite
differences (``torch.autograd.gradcheck`` in float64) check the autograd path itself.
"""

from __future__ import annotations

import numpy as np
import opt_einsum
import pytest
from helpers import BACKENDS, EPS
from hypothesis import given, settings
from hypothesis import strategies as st

import tensormoe
from tensormoe.layer import LAYERS, make_layer


@st.composite
def configs(draw, max_size=4):
    """Factorization, 1-3 expert levels, small dims and ranks, bias, gate, batch size, seed."""
    levels = draw(st.integers(1, 3))
    return {
        "kind": draw(st.sampled_from(sorted(LAYERS))),
        "expert_dims": draw(st.lists(st.integers(1, max_size), min_size=levels, max_size=levels)),
        "in_dim": draw(st.integers(1, max_size)),
        "out_dim": draw(st.integers(1, max_size)),
        "rank": draw(st.integers(1, 3)),
        "bias": draw(st.booleans()),
        "gate": draw(st.sampled_from(["entmax15", "softmax", "sparsemax"])),
        "batch": draw(st.integers(1, 3)),
        "seed": draw(st.integers(0, 2**16)),
    }


def build(cfg, dtype="float32"):
    with tensormoe.backend_context("numpy"):
        return make_layer(
            cfg["kind"], cfg["in_dim"], cfg["out_dim"], cfg["expert_dims"], cfg["rank"], bias=cfg["bias"],
            gate=cfg["gate"], seed=cfg["seed"], dtype="float64",
        )


def numpy_inputs(layer, cfg):
    """float64 NumPy params (random gates too), input, simplex coefficients and loss weights ``r``."""
    rng = np.random.default_rng(cfg["seed"] + 7)
    params = {k: np.asarray(v, dtype=np.float64) for k, v in layer.params.items()}
    for h, n in enumerate(layer.expert_dims):
        params[f"gate_{h}"] = rng.normal(size=(layer.in_dim, n))
    b = cfg["batch"]
    x = rng.normal(size=(b, layer.in_dim))
    coeffs = [rng.dirichlet(np.ones(n), size=b) for n in layer.expert_dims]
    r = rng.normal(size=(b, layer.out_dim))
    return params, x, coeffs, r


def gradient_bounds(layer, params, x, coeffs, r, dtype):
    """Elementwise bound on |factorized grad - dense grad| for every operand of the contraction.

    The gradient of ``sum(r * y)`` with respect to one operand is the contraction of all the
    others with ``r``; both evaluations sum the same products in another order, so their
    difference is at most ``2 * n * eps`` times the same contraction over absolute values
    (``n`` bounds the roundings on any term's way, as in ``helpers.rounding_tolerance``).
    """
    f = layer.factorization
    xin = np.concatenate([x, np.ones((len(x), 1))], -1) if layer.bias else x
    names = [f"a{h}" for h in range(layer.hierarchy)] + ["x"] + list(f.network())
    operands = [np.abs(a) for a in coeffs] + [np.abs(xin)] + [np.abs(params[n]) for n in f.network()]
    inputs, output = f.forward_equation().split("->")
    terms = inputs.split(",")
    n_round = sum(f.dims) + sum(s for shape in f.param_shapes().values() for s in shape) + len(operands) + 1
    bounds = {}
    for k, name in enumerate(names):
        others = [t for j, t in enumerate(terms) if j != k]
        ops = [o for j, o in enumerate(operands) if j != k]
        bound = opt_einsum.contract(",".join([*others, output]) + "->" + terms[k], *ops, np.abs(r))
        bounds[name] = 2 * n_round * EPS[dtype] * bound + np.finfo(np.float64).tiny
    bounds["x"] = bounds["x"][:, : layer.in_dim]
    return bounds


def assert_within(name, got, expected, bound):
    err = np.abs(np.asarray(got, dtype=np.float64) - np.asarray(expected, dtype=np.float64))
    assert err.shape == bound.shape, name
    assert np.all(err <= bound), f"{name}: max error {err.max():.3g}, bound there {bound[err > bound].min():.3g}"


# --- PyTorch -----------------------------------------------------------------------------

torch = pytest.importorskip("torch") if "pytorch" in BACKENDS else None
needs_torch = pytest.mark.skipif("pytorch" not in BACKENDS, reason="PyTorch is not installed")
needs_jax = pytest.mark.skipif("jax" not in BACKENDS, reason="JAX is not installed")


def torch_grads(layer, params, x, coeffs, r, dense, dtype, with_gates=False):
    t = {k: torch.tensor(v, dtype=getattr(torch, dtype), requires_grad=True) for k, v in params.items()}
    tx = torch.tensor(x, dtype=t["gate_0"].dtype, requires_grad=True)
    ta = None if with_gates else [torch.tensor(a, dtype=tx.dtype, requires_grad=True) for a in coeffs]
    forward = layer.dense_forward if dense else layer.apply
    y = forward(t, tx, ta, backend="pytorch")
    (y * torch.tensor(r, dtype=tx.dtype)).sum().backward()
    grads = {k: v.grad for k, v in t.items() if not k.startswith("gate_") or with_gates}
    grads["x"] = tx.grad
    if ta is not None:
        grads.update({f"a{h}": a.grad for h, a in enumerate(ta)})
    return {k: None if v is None else v.detach().numpy().astype(np.float64) for k, v in grads.items()}


@needs_torch
@given(cfg=configs())
def test_torch_gradients_equal_dense_gradients(cfg):
    """float32 autograd: factors, input and coefficients, within the rounding bound."""
    layer = build(cfg)
    params, x, coeffs, r = numpy_inputs(layer, cfg)
    # the bound is computed from the float32-rounded operands the framework sees
    p32 = {k: v.astype(np.float32).astype(np.float64) for k, v in params.items()}
    x32, c32 = x.astype(np.float32).astype(np.float64), [a.astype(np.float32).astype(np.float64) for a in coeffs]
    bounds = gradient_bounds(layer, p32, x32, c32, r.astype(np.float32).astype(np.float64), "float32")
    got = torch_grads(layer, params, x, coeffs, r, dense=False, dtype="float32")
    ref = torch_grads(layer, params, x, coeffs, r, dense=True, dtype="float32")
    assert set(got) == set(bounds)
    for name, bound in bounds.items():
        assert_within(name, got[name], ref[name], bound)


@needs_torch
@given(cfg=configs())
def test_torch_gate_gradients_equal_dense_gradients(cfg):
    """float64, gates active: gradients reach the gate weights through the coefficients."""
    layer = build(cfg)
    params, x, coeffs, r = numpy_inputs(layer, cfg)
    got = torch_grads(layer, params, x, coeffs, r, dense=False, dtype="float64", with_gates=True)
    ref = torch_grads(layer, params, x, coeffs, r, dense=True, dtype="float64", with_gates=True)
    assert set(got) == {*params, "x"}
    # The coefficients are computed identically on both paths, so the gradients differ only
    # by the contraction's float64 rounding, passed back through the gates' Jacobian.  Gate
    # gradients can cancel to ~0 (identical experts), so the scale is the loss's largest
    # gradient: float64 rounding (~1e-16 of it) with a margin of 1e6 for the Jacobians.
    scale = max(np.abs(g).max() for g in ref.values())
    for name in got:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-9, atol=1e-10 * scale, err_msg=name)


@needs_torch
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_torch_gradients_match_finite_differences(kind):
    """torch.autograd.gradcheck (central differences, float64) through the module's forward."""
    from tensormoe.torch import wrap

    cfg = {"kind": kind, "expert_dims": [3, 2], "in_dim": 3, "out_dim": 2, "rank": 2, "bias": True,
           "gate": "softmax", "batch": 2, "seed": 1}
    module = wrap(build(cfg))
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for h in range(2):
            module.params[f"gate_{h}"].copy_(torch.tensor(rng.normal(size=module.params[f"gate_{h}"].shape)))
    names = list(module.params)
    x = torch.tensor(rng.normal(size=(2, 3)), requires_grad=True)

    def f(x, *values):
        return module.layer.apply(dict(zip(names, values)), x, backend="pytorch")

    assert torch.autograd.gradcheck(f, (x, *[p.detach().clone().requires_grad_() for p in module.params.values()]))


# --- JAX ---------------------------------------------------------------------------------


@needs_jax
@settings(max_examples=8)
@given(cfg=configs(max_size=3))
def test_jax_gradients_equal_dense_gradients(cfg):
    """jax.grad in float32 (x64 stays off): factors, input and coefficients, within the rounding bound."""
    import jax
    import jax.numpy as jnp

    layer = build(cfg)
    params, x, coeffs, r = numpy_inputs(layer, cfg)
    p32 = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in params.items() if not k.startswith("gate_")}
    gates = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in params.items() if k.startswith("gate_")}
    x32 = jnp.asarray(x, dtype=jnp.float32)
    c32 = [jnp.asarray(a, dtype=jnp.float32) for a in coeffs]
    r32 = jnp.asarray(r, dtype=jnp.float32)

    def loss(forward):
        def f(p, x, a):
            return jnp.sum(r32 * forward({**p, **gates}, x, a, backend="jax"))

        return jax.grad(f, argnums=(0, 1, 2))(p32, x32, c32)

    (gp, gx, ga), (rp, rx, ra) = loss(layer.apply), loss(layer.dense_forward)
    assert gx.dtype == jnp.float32 and not jax.config.jax_enable_x64
    as64 = lambda v: np.asarray(v, dtype=np.float64)  # noqa: E731
    bounds = gradient_bounds(
        layer, {k: as64(v) for k, v in {**p32, **gates}.items()}, as64(x32), [as64(a) for a in c32], as64(r32),
        "float32",
    )
    for name in p32:
        assert_within(name, gp[name], rp[name], bounds[name])
    assert_within("x", gx, rx, bounds["x"])
    for h in range(layer.hierarchy):
        assert_within(f"a{h}", ga[h], ra[h], bounds[f"a{h}"])


@needs_jax
@needs_torch
@pytest.mark.parametrize("gate", ["entmax15", "sparsemax", "softmax"])
def test_jax_gradients_through_the_gates_match_torch(gate):
    """Gates active: jax.grad (float32) agrees with PyTorch autograd (float64), finite everywhere.

    Sparse gates have experts outside the support; their gradients must be exact zeros, not
    NaN (a square root at zero inside 1.5-entmax's threshold once sent 0 * inf back on JAX).
    """
    import jax
    import jax.numpy as jnp

    cfg = {"kind": "cp", "expert_dims": [6, 3], "in_dim": 5, "out_dim": 4, "rank": 3, "bias": True,
           "gate": gate, "batch": 8, "seed": 3}
    layer = build(cfg)
    params, x, _, r = numpy_inputs(layer, cfg)
    ref = torch_grads(layer, params, x, None, r, dense=False, dtype="float64", with_gates=True)
    jp = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in params.items()}
    grads = jax.grad(lambda p: jnp.sum(jnp.asarray(r, jnp.float32) * layer.apply(p, jnp.asarray(x, jnp.float32),
                                                                                  backend="jax")))(jp)
    scale = max(np.abs(g).max() for g in ref.values())
    for name, g in grads.items():
        g = np.asarray(g, dtype=np.float64)
        assert np.all(np.isfinite(g)), name
        # float32 against float64: eps32 (~1e-7) of the largest gradient, with a margin of 1e3
        np.testing.assert_allclose(g, ref[name], rtol=1e-3, atol=1e-4 * scale, err_msg=name)
