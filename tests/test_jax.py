"""The JAX pytree shells: jit, grad, layers through jit, no float64 leak, plans reused across traces."""

from __future__ import annotations

import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import tensormoe  # noqa: E402
from tensormoe import jax as tmj  # noqa: E402
from tensormoe.contraction import cache_info  # noqa: E402

# one shape for most tests, so that JAX compiles few programs
LAYERS = {
    "cp": lambda **kw: tmj.CPMMoE(6, 5, [4, 3], rank=3, **kw),
    "tucker": lambda **kw: tmj.TuckerMMoE(6, 5, [4, 3], ranks=[2, 3, 4, 3], **kw),
    "tt": lambda **kw: tmj.TTMMoE(6, 5, [4, 3], ranks=3, **kw),
    "tr": lambda **kw: tmj.TRMMoE(6, 5, [4, 3], ranks=2, **kw),
}
X = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")


def with_random_gates(layer, seed=0):
    rng = np.random.default_rng(seed)
    params = dict(layer.params)
    for name, value in params.items():
        if name.startswith("gate_"):
            params[name] = jnp.asarray(rng.normal(size=value.shape), dtype=jnp.float32)
    return layer.replace(params)


@functools.cache
def shared(kind):
    """One layer per kind for the whole module: its forward compiles once."""
    return with_random_gates(LAYERS[kind]())


def numpy_reference(layer, x):
    with tensormoe.backend_context("numpy"):
        return layer.layer.apply({k: np.asarray(v) for k, v in layer.params.items()}, np.asarray(x))


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_layer_is_a_pytree_of_its_parameters(kind):
    layer = LAYERS[kind]()
    leaves, treedef = jax.tree_util.tree_flatten(layer)
    assert len(leaves) == len(layer.layer.param_shapes())
    assert sorted(tuple(leaf.shape) for leaf in leaves) == sorted(layer.layer.param_shapes().values())
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert type(rebuilt) is type(layer) and rebuilt.layer is layer.layer
    # same seed, same weights as the functional layer on NumPy
    with tensormoe.backend_context("numpy"):
        core = tensormoe.layer.layer_from_config(layer.config())
    for name, value in core.params.items():
        np.testing.assert_array_equal(np.asarray(layer.params[name]), value)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_jit_of_a_layer_equals_numpy(kind):
    layer = shared(kind)
    y = jax.jit(lambda layer, x: layer(x))(layer, jnp.asarray(X))
    np.testing.assert_allclose(np.asarray(y), numpy_reference(layer, X), rtol=1e-5, atol=1e-6)
    y_apply = jax.jit(layer.apply)(layer.params, jnp.asarray(X))
    np.testing.assert_allclose(np.asarray(y_apply), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_layers_of_one_configuration_share_one_trace():
    traces = []

    @jax.jit
    def f(layer, x):
        traces.append(None)
        return layer(x)

    a, b = LAYERS["cp"](seed=1), LAYERS["cp"](seed=2)
    ya, yb = f(a, jnp.asarray(X)), f(b, jnp.asarray(X))
    assert len(traces) == 1
    assert not np.allclose(np.asarray(ya), np.asarray(yb))
    f(LAYERS["cp"](gate="softmax"), jnp.asarray(X))  # another computation: a new trace
    assert len(traces) == 2


def test_plans_are_reused_across_traces():
    x = jnp.asarray(X)
    jax.jit(lambda layer, x: layer(x))(shared("tr"), x)
    before = cache_info()
    fresh = LAYERS["tr"](seed=5)  # a new layer object of known shapes: traced anew
    jax.jit(lambda layer, x: 2 * layer(x))(fresh, x)
    after = cache_info()
    assert after["hits"] > before["hits"], "the new trace did not look its plan up"
    assert after["misses"] == before["misses"], "a trace of known shapes planned again"


def test_grad_is_a_layer_a_step_lowers_the_loss_and_no_float64_leaks():
    assert not jax.config.jax_enable_x64
    layer = shared("tucker")
    x = jnp.asarray(X)
    target = jnp.asarray(np.random.default_rng(1).normal(size=(4, 5)), dtype=jnp.float32)

    @jax.jit
    def loss(layer):
        return jnp.mean((layer(x) - target) ** 2)

    value, grads = jax.value_and_grad(loss)(layer)
    assert type(grads) is type(layer) and set(grads.params) == set(layer.params)
    assert all(g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g))) for g in grads.params.values())
    assert all(float(jnp.abs(g).max()) > 0 for g in grads.params.values())
    stepped = jax.tree_util.tree_map(lambda p, g: p - 0.05 * g, layer, grads)
    assert float(loss(stepped)) < float(value)
    assert value.dtype == jnp.float32 and layer(x).dtype == jnp.float32
    assert all(v.dtype == jnp.float32 for v in layer.init(3).values())
    assert not jax.config.jax_enable_x64


@pytest.mark.parametrize("flag", tensormoe.available_backends())
def test_layer_computes_on_jax_whatever_the_flag(flag):
    layer = shared("cp")
    x = jnp.asarray(X)
    expected = np.asarray(layer(x))
    with tensormoe.backend_context(flag):
        y = layer(x)
        assert isinstance(y, jax.Array)
        np.testing.assert_array_equal(np.asarray(y), expected)


def test_vmap_and_wrap():
    core = tensormoe.CPMMoE(6, 5, [4, 3], rank=3, seed=9)  # NumPy parameters
    layer = tmj.wrap(core)
    assert type(layer) is tmj.CPMMoE
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(X))), core(X), rtol=1e-5, atol=1e-6)
    batched = jax.vmap(layer)(jnp.stack([jnp.asarray(X), 2 * jnp.asarray(X)]))
    np.testing.assert_allclose(np.asarray(batched[1]), np.asarray(layer(2 * jnp.asarray(X))), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"params\['factor_0'\] has shape \(3, 3\); expected \(4, 3\)"):
        layer.replace({**layer.params, "factor_0": jnp.zeros((3, 3))})


def test_router_objects_are_static_too():
    """Layers built with Router objects (which config() cannot name) still go through jit."""
    from tensormoe.routers import TopKRouter

    layer = tmj.CPMMoE(6, 5, [4, 3], rank=3, router=[TopKRouter(k=2, noise=None), "softmax"])
    x = jnp.asarray(X)
    y = jax.jit(lambda layer, x: layer(x))(layer, x)
    np.testing.assert_allclose(np.asarray(y), numpy_reference(layer, X), rtol=1e-5, atol=1e-6)
    other = tmj.CPMMoE(6, 5, [4, 3], rank=3, router=[TopKRouter(k=2, noise=None), "softmax"], seed=1)
    assert jax.tree_util.tree_structure(other) == jax.tree_util.tree_structure(layer)
    assert jax.tree_util.tree_structure(LAYERS["cp"]()) != jax.tree_util.tree_structure(layer)
