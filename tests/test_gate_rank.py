"""Low-rank gates (``gate_rank=``): the same layer as a full gate ``gate_down @ gate_up``, counted and stored right."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from helpers import BACKENDS, to_numpy
from hypothesis import given, settings
from hypothesis import strategies as st

import tensormoe
from tensormoe.tools import io
from tensormoe.accounting import cost as config_cost
from tensormoe.layer import LAYERS, layer_from_config, make_layer
from tensormoe.ops import get_ops
from tensormoe.routers import DenseRouter, SoftRouter, TopKRouter


@st.composite
def configs(draw):
    kind = draw(st.sampled_from(sorted(LAYERS)))
    levels = draw(st.integers(1, 2))
    expert_dims = draw(st.lists(st.integers(2, 6), min_size=levels, max_size=levels))
    router = draw(st.sampled_from([None, "softmax", "top2", "expert_choice", ["top1", "sparsemax"][:levels]]))
    return {
        "kind": kind,
        "in_dim": draw(st.integers(2, 6)),
        "out_dim": draw(st.integers(1, 4)),
        "expert_dims": expert_dims,
        "ranks": draw(st.integers(1, 3)),
        "gate_rank": draw(st.integers(1, 3)),
        "router": router,
        "bias": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


def build(cfg, **overrides):
    cfg = {**cfg, **overrides}
    return make_layer(cfg.pop("kind"), cfg.pop("in_dim"), cfg.pop("out_dim"), cfg.pop("expert_dims"),
                      cfg.pop("ranks"), **cfg)


def random_params(layer, rng):
    ops = get_ops()
    return {k: ops.asarray(rng.normal(size=s), layer.dtype) for k, s in layer.param_shapes().items()}


def full_gate_params(low, full, params):
    """The full-gate layer's parameters: the same factors, every ``P`` replaced by ``P_down @ P_up``."""
    ops = get_ops()
    out = {}
    for name in full.param_shapes():
        if name in params:
            out[name] = params[name]
        else:  # gate_h from gate_down_h @ gate_up_h (gate_noise_h likewise), multiplied in float64
            stem, level = name.rsplit("_", 1)
            product = to_numpy(params[f"{stem}_down_{level}"]) @ to_numpy(params[f"{stem}_up_{level}"])
            out[name] = ops.asarray(product, low.dtype)
    return out


def test_low_rank_layer_equals_its_dense_forward_and_the_full_gate_layer(backend):
    # JAX compiles every new shape (four functions per example): fewer examples there
    @settings(max_examples=3 if backend == "jax" else 10)
    @given(cfg=configs())
    def check(cfg):
        low = build(cfg)
        full = build(cfg, gate_rank=None)
        rng = np.random.default_rng(cfg["seed"])
        params = random_params(low, rng)
        x = get_ops().asarray(rng.normal(size=(2, 3, cfg["in_dim"])), "float32")
        y = to_numpy(low.apply(params, x))
        scale = 1.0 + np.abs(y).max()
        np.testing.assert_allclose(y, to_numpy(low.dense_forward(params, x)), rtol=1e-4, atol=1e-4 * scale)
        # an independent reference: the full-gate layer with gate = gate_down @ gate_up computes the same
        y_full = to_numpy(full.apply(full_gate_params(low, full, params), x))
        np.testing.assert_allclose(y, y_full, rtol=1e-3, atol=1e-3 * scale)
        if cfg["router"] in (None, "softmax"):  # dense coefficients: those of the product's logits
            a_low = low.coefficients(params, x)
            a_full = full.coefficients(full_gate_params(low, full, params), x)
            for a, b in zip(a_low, a_full):
                np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-4, atol=1e-5)

    check()


@pytest.mark.parametrize("router", [DenseRouter("softmax", norm=None, rank=2), TopKRouter(k=2, rank=2),
                                    SoftRouter(slots_per_expert=2, rank=2)])
def test_router_logits_are_those_of_the_product(backend, router):
    ops = get_ops()
    rng = np.random.default_rng(0)
    shapes = router.param_shapes(5, 4)
    params = {k: rng.normal(size=s) for k, s in shapes.items()}
    assert shapes["gate_down"] == (5, 2) and shapes["gate_up"][0] == 2
    x = rng.normal(size=(6, 5))
    full = {("gate" if k == "gate_down" else "gate_noise"): params[k] @ params[k.replace("down", "up")]
            for k in params if k.endswith("_down")}
    cast = lambda p: {k: ops.asarray(v, "float32") for k, v in p.items()}  # noqa: E731
    xs = ops.asarray(x, "float32")
    got = router(cast(params), xs)
    want = type(router).__new__(type(router))
    want.__dict__.update({**vars(router), "rank": None})
    expected = want(cast(full), xs)
    np.testing.assert_allclose(to_numpy(got.logits), to_numpy(expected.logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_numpy(got.logits), x @ full["gate"], rtol=1e-4, atol=1e-4)


def test_parameters_names_init_and_levels_that_keep_a_full_gate():
    layer = tensormoe.CPMMoE(8, 3, [16, 4], rank=2, gate_rank=4, router="top2")
    shapes = layer.param_shapes()
    # level 0: 4 < min(8, 16), low-rank gate and noise; level 1: 4 >= min(8, 4), full matrices
    assert shapes["gate_down_0"] == (8, 4) and shapes["gate_up_0"] == (4, 16)
    assert shapes["gate_noise_down_0"] == (8, 4) and shapes["gate_noise_up_0"] == (4, 16)
    assert shapes["gate_1"] == (8, 4) and shapes["gate_noise_1"] == (8, 4)
    assert not any(k.endswith("_1") and ("down" in k or "up" in k) for k in shapes)
    dense = tensormoe.CPMMoE(8, 3, [16], rank=2, gate_rank=4)
    p = {k: to_numpy(v) for k, v in dense.params.items()}
    # the product starts at zero (uniform coefficients), the down factor does not (its gradient is not stuck)
    assert np.all(p["gate_up_0"] == 0) and p["gate_down_0"].std() > 0.1 / np.sqrt(8)
    a, = dense.coefficients(None, np.random.default_rng(0).normal(size=(3, 8)).astype("float32"))
    np.testing.assert_allclose(a, 1 / 16, rtol=1e-6)
    # same seed, same factors as the full-gate layer (the gates are drawn after them)
    full = tensormoe.CPMMoE(8, 3, [16], rank=2)
    for k in full.factorization.param_shapes():
        np.testing.assert_array_equal(to_numpy(full.params[k]), p[k])


def test_accounting_counts_the_low_rank_gates():
    batch, in_dim, dims, r = 5, 12, [16, 3], 4
    for kind, ranks in (("cp", 3), ("tucker", 2), ("tt", 2), ("tr", 2)):
        layer = make_layer(kind, in_dim, 7, dims, ranks, gate_rank=r)
        c = layer.cost(batch)
        # level 0 low-rank (4 < 12, 16); level 1 keeps its 12 x 3 gate (4 >= 3)
        assert c.gate_params == r * (in_dim + 16) + in_dim * 3
        assert c.gate_flops == 2 * batch * r * (in_dim + 16) + 2 * batch * in_dim * 3
        assert c.params == layer.n_params == c.factor_params + c.gate_params
        assert c.factor_params == layer.factorization.n_params()
        assert c == config_cost(kind, in_dim, 7, dims, ranks, batch_size=batch, gate_rank=r)
        full = make_layer(kind, in_dim, 7, dims, ranks).cost(batch)
        assert (full.forward_flops, full.factor_params) == (c.forward_flops, c.factor_params)
        assert full.gate_params == in_dim * sum(dims)


def test_config_round_trip_and_configs_without_the_key():
    layer = tensormoe.TRMMoE(6, 4, [5, 3], ranks=2, gate_rank=2, router=["top1", "softmax"])
    config = layer.config()
    assert config["gate_rank"] == 2
    copy = layer_from_config(config)
    assert copy.config() == config and copy.param_shapes() == layer.param_shapes()
    old = {k: v for k, v in tensormoe.TRMMoE(6, 4, [5, 3], ranks=2).config().items() if k != "gate_rank"}
    assert layer_from_config(old).gate_rank is None
    assert "gate_rank=2" in repr(layer) and "gate_rank" not in repr(copy.__class__(6, 4, [5], ranks=2))


@pytest.mark.parametrize("source", BACKENDS)
def test_save_load_round_trip_and_files_from_before_gate_rank(tmp_path, source):
    with tensormoe.backend_context(source):
        layer = tensormoe.CPMMoE(6, 4, [5, 4], rank=3, gate_rank=2, router="top2")
        layer.params = random_params(layer, np.random.default_rng(1))
        x = get_ops().asarray(np.random.default_rng(2).normal(size=(3, 6)), "float32")
        y = to_numpy(layer(x))
    path = tmp_path / "w.npz"
    io.save(layer, path)
    for target in BACKENDS:
        with tensormoe.backend_context(target):
            rebuilt = io.layer_from_file(path)
            assert rebuilt.config() == layer.config()
            loaded = io.load(tensormoe.CPMMoE(6, 4, [5, 4], rank=3, gate_rank=2, router="top2", seed=5), path)
            xt = get_ops().asarray(to_numpy(x), "float32")
            for got in (rebuilt, loaded):
                np.testing.assert_allclose(to_numpy(got(xt)), y, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="gate_rank"):
            io.load(tensormoe.CPMMoE(6, 4, [5, 4], rank=3, gate_rank=3, router="top2"), path)
    # a file written before gate_rank existed: no key in its header, full gates
    old_layer = tensormoe.CPMMoE(6, 4, [5], rank=3)
    old = tmp_path / "old.npz"
    io.save(old_layer, old)
    with zipfile.ZipFile(old) as z:
        members = {name: z.read(name) for name in z.namelist()}
    header_member = next(n for n in members if n.startswith("__tensormoe__"))
    header = json.loads(np.load(old)["__tensormoe__"].tobytes())
    del header["config"]["gate_rank"]
    buffer = tmp_path / "h.npy"
    np.save(buffer, np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8))
    members[header_member] = buffer.read_bytes()
    with zipfile.ZipFile(old, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    assert "gate_rank" not in io.read_config(old)
    assert io.layer_from_file(old).gate_rank is None
    io.load(tensormoe.CPMMoE(6, 4, [5], rank=3, seed=4), old)
    with pytest.raises(ValueError, match="gate_rank"):
        io.load(tensormoe.CPMMoE(6, 4, [5], rank=3, gate_rank=2), old)


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [(0, ValueError, "gate_rank must be a positive integer; got 0"),
     (-2, ValueError, "gate_rank must be a positive integer; got -2"),
     (2.0, TypeError, "gate_rank must be a positive integer; got 2.0"),
     (True, TypeError, "gate_rank must be a positive integer; got True"),
     ("4", TypeError, "gate_rank must be a positive integer; got '4'")],
)
def test_invalid_gate_rank_is_named(value, error, message):
    with pytest.raises(error, match=message):
        tensormoe.CPMMoE(4, 3, [5], rank=2, gate_rank=value)


def test_invalid_router_rank_and_conflicts():
    with pytest.raises(ValueError, match="rank must be a positive integer .* got 0"):
        DenseRouter(rank=0)
    with pytest.raises(TypeError, match="rank must be a positive integer .* got 1.5 of type float"):
        TopKRouter(rank=1.5)
    with pytest.raises(ValueError, match=r"gate_rank=3 conflicts with router\[1\], a TopKRouter with rank=2"):
        tensormoe.CPMMoE(8, 3, [6, 6], rank=2, gate_rank=3, router=["softmax", TopKRouter(k=2, rank=2)])
    # a Router object without a rank takes the layer's, and is not changed itself
    mine = TopKRouter(k=2)
    layer = tensormoe.CPMMoE(8, 3, [6], rank=2, gate_rank=3, router=mine)
    assert mine.rank is None and layer.routers[0].rank == 3 and "gate_down_0" in layer.params
    # a Router object's own rank needs no gate_rank
    assert "gate_up_0" in tensormoe.CPMMoE(8, 3, [6], rank=2, router=DenseRouter(rank=2)).params


@pytest.mark.skipif("pytorch" not in BACKENDS, reason="PyTorch is not installed")
def test_torch_both_factors_learn_and_the_mlp_freezes_the_second_gates():
    import torch

    import tensormoe.torch as tmt

    module = tmt.CPMMoE(8, 3, [6], rank=2, gate_rank=2)
    x, target = torch.randn(16, 8, generator=torch.Generator().manual_seed(0)), torch.randn(16, 3)
    before = {k: v.detach().clone() for k, v in module.params.items()}
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    # step 1 moves gate_up only (gate_down's gradient is zero while gate_up is), step 2 both.  One level:
    # with the reference init a second level's gates get no gradient at all, full or low-rank (its expert
    # factor starts all ones and, under uniform coefficients, every row gets the same update)
    for _ in range(2):
        optimizer.zero_grad()
        ((module(x) - target) ** 2).mean().backward()
        optimizer.step()
    for name in ("gate_down_0", "gate_up_0"):
        assert not torch.equal(module.params[name].detach(), before[name]), name
    mlp = tmt.MMoEMLP(tmt.CPMMoE(8, 16, [6], rank=2, gate_rank=2), tmt.CPMMoE(16, 8, [6], rank=2, gate_rank=2))
    frozen = {k for k, v in mlp.second.params.items() if not v.requires_grad}
    assert frozen == {"gate_down_0", "gate_up_0"}
    assert all(v.requires_grad for v in mlp.first.params.values())
    assert "gate_rank=2" in repr(mlp.first)


@pytest.mark.skipif("jax" not in BACKENDS, reason="JAX is not installed")
def test_jax_both_factors_learn_under_jit():
    import jax
    import jax.numpy as jnp

    import tensormoe.jax as tmj

    layer = tmj.TuckerMMoE(8, 3, [6], ranks=2, gate_rank=2)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 8)), dtype=jnp.float32)
    target = jnp.asarray(np.random.default_rng(1).normal(size=(16, 3)), dtype=jnp.float32)

    @jax.jit
    def step(layer):
        grads = jax.grad(lambda m: jnp.mean((m(x) - target) ** 2))(layer)
        return jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, layer, grads), grads

    stepped, grads = step(layer)
    assert float(jnp.abs(grads.params["gate_up_0"]).max()) > 0
    stepped, grads = step(stepped)
    assert float(jnp.abs(grads.params["gate_down_0"]).max()) > 0
    for name in ("gate_down_0", "gate_up_0"):
        assert not bool(jnp.array_equal(stepped.params[name], layer.params[name])), name
