"""Routers: the sparse contraction against the dense one, each router against a NumPy reference, aux losses."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import BACKENDS, rounding_tolerance, to_numpy
from hypothesis import given, settings
from hypothesis import strategies as st

import tensormoe
from tensormoe import routing as R
from tensormoe.ops import get_ops

LAYERS = {
    "cp": lambda i, o, e, r, **kw: tensormoe.CPMMoE(i, o, e, rank=r, **kw),
    "tucker": lambda i, o, e, r, **kw: tensormoe.TuckerMMoE(i, o, e, ranks=r, **kw),
    "tt": lambda i, o, e, r, **kw: tensormoe.TTMMoE(i, o, e, ranks=r, **kw),
    "tr": lambda i, o, e, r, **kw: tensormoe.TRMMoE(i, o, e, ranks=r, **kw),
}


def randomise_gates(layer, seed, scale=1.0):
    """Distinct non-zero router parameters, so that rows route differently (and without ties)."""
    rng = np.random.default_rng(seed)
    ops = get_ops()
    params = dict(layer.params)
    for name, shape in layer.param_shapes().items():
        if name.startswith("gate"):
            params[name] = ops.asarray(scale * rng.normal(size=shape), layer.dtype)
    return params


@pytest.fixture
def numpy_backend():
    with tensormoe.backend_context("numpy"):
        yield


def numpy_params(params):
    return {k: to_numpy(v) for k, v in params.items()}


# -- the sparse contraction -------------------------------------------------------------


@st.composite
def sparse_configs(draw, kind, levels):
    expert_dims = draw(st.lists(st.integers(1, 6), min_size=levels, max_size=levels))
    sparse = draw(st.lists(st.booleans(), min_size=levels, max_size=levels).filter(any))
    return {
        "kind": kind,
        "expert_dims": expert_dims,
        "in_dim": draw(st.integers(1, 5)),
        "out_dim": draw(st.integers(1, 5)),
        "rank": draw(st.integers(1, 3)),
        "bias": draw(st.booleans()),
        "rows": draw(st.integers(1, 5)),
        "sparse": sparse,
        "k": [draw(st.integers(1, n)) for n in expert_dims],
        "seed": draw(st.integers(0, 2**16)),
    }


def check_sparse_equals_dense(cfg, backend):
    """``apply`` with (indices, weights) per sparse level equals the dense path with zeros elsewhere."""
    rng = np.random.default_rng(cfg["seed"])
    with tensormoe.backend_context("numpy"):
        layer = LAYERS[cfg["kind"]](cfg["in_dim"], cfg["out_dim"], cfg["expert_dims"], cfg["rank"],
                                    bias=cfg["bias"], seed=cfg["seed"])
    params_np = numpy_params(layer.params)
    x_np = rng.normal(size=(cfg["rows"], cfg["in_dim"])).astype(np.float32)
    routing_np, dense_np = [], []
    for n, k, sparse in zip(cfg["expert_dims"], cfg["k"], cfg["sparse"]):
        weights = rng.normal(size=(cfg["rows"], k if sparse else n)).astype(np.float32)
        if sparse:  # k distinct experts per row, in random order
            index = np.argsort(rng.random((cfg["rows"], n)), axis=-1)[:, :k]
            dense = np.zeros((cfg["rows"], n), np.float32)
            np.put_along_axis(dense, index, weights, axis=-1)
            routing_np.append((weights, index))
        else:
            dense = weights
            routing_np.append((weights, None))
        dense_np.append(dense)
    with tensormoe.backend_context(backend):
        ops = get_ops()
        routing = [R.Routing(weights=ops.asarray(w), indices=None if i is None else ops.asarray(i))
                   for w, i in routing_np]
        y_sparse = to_numpy(layer.apply(None, ops.asarray(x_np), routing=routing))
    # the dense path (and the reference through W) on NumPy: independent of the gather
    with tensormoe.backend_context("numpy"):
        y_dense = to_numpy(layer.apply(None, x_np, coefficients=dense_np))
        y_ref = to_numpy(layer.dense_forward(None, x_np, coefficients=dense_np))
    tol = rounding_tolerance(layer, params_np, x_np.astype(np.float64), [d.astype(np.float64) for d in dense_np])
    assert np.all(np.abs(y_sparse - y_dense) <= 2 * tol), np.abs(y_sparse - y_dense).max()
    assert np.all(np.abs(y_sparse - y_ref) <= 2 * tol)


EXAMPLES = {"numpy": 6, "pytorch": 6, "jax": 1}


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_sparse_path_equals_dense_path_with_zeroed_coefficients(kind, levels, name):
    # JAX compiles every new shape: one example per (format, depth) there
    @settings(max_examples=EXAMPLES[name])
    @given(cfg=sparse_configs(kind, levels))
    def check(cfg):
        check_sparse_equals_dense(cfg, name)

    check()


def test_sparse_cost_does_not_grow_with_the_number_of_experts():
    """The planned contraction of a top-2 level reads B * k factor rows: its FLOPs do not depend on N."""
    flops = []
    for n in (16, 1_000_000):
        f = tensormoe.CP([n, 65, 64], rank=32, n_expert_modes=1)
        shapes = [(8, 2), (8, 65), (8, 2, 32), (65, 32), (64, 32)]
        flops.append(tensormoe.get_plan(f.routed_equation([True]), *shapes).flops)
        gathered = f.gather_params({k: np.zeros(s, np.float32) if k != "factor_0" else np.zeros((n, 32), np.float32)
                                    for k, s in f.param_shapes().items()}, {0: np.zeros((8, 2), int)}, get_ops("numpy"))
        assert gathered[0].shape == (8, 2, 32)
    assert flops[0] == flops[1]


def test_gather_of_a_factor_with_two_expert_axes():
    """A parameter carrying two sparse expert axes is gathered on both: [B, k1, k2, rest]."""
    f = tensormoe.Tucker([5, 4, 3, 2], ranks=2, n_expert_modes=2)
    f.network = lambda: {"w": "bcf", "v": "dg"}  # a made-up network: one parameter with both expert letters
    w = np.random.default_rng(0).normal(size=(5, 4, 2))
    i1, i2 = np.array([[0, 4], [1, 2]]), np.array([[3], [0]])
    out, _ = f.gather_params({"w": w, "v": np.ones((3, 2))}, {0: i1, 1: i2}, get_ops("numpy"))
    assert out.shape == (2, 2, 1, 2)
    np.testing.assert_array_equal(out[1, 0, 0], w[1, 0])
    assert f.routed_equation([True, True]).split(",")[3] == "ajkf"


# -- routers against NumPy references ----------------------------------------------------


def softmax_np(z, axis=-1):
    e = np.exp(z - z.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def test_default_router_is_the_mmoe_gate(backend):
    """router=None and router='entmax15' give today's entmax15(layernorm(x @ G)) and parameter names."""
    x_np = np.random.default_rng(1).normal(size=(4, 6))
    layer = tensormoe.CPMMoE(6, 3, [5, 2], rank=2)
    assert list(layer.param_shapes()) == ["factor_0", "factor_1", "factor_2", "factor_3", "gate_0", "gate_1"]
    params = randomise_gates(layer, 0)
    x = get_ops().asarray(x_np, "float32")
    named = tensormoe.CPMMoE(6, 3, [5, 2], rank=2, router="entmax15")
    for a, b, h in zip(layer.coefficients(params, x), named.coefficients(params, x), range(2)):
        z = x_np @ to_numpy(params[f"gate_{h}"])
        z = (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + 1e-5)
        with tensormoe.backend_context("numpy"):
            expected = tensormoe.entmax15(z)
        np.testing.assert_allclose(to_numpy(a), expected, atol=1e-5)
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_top_k_selects_the_largest_logits(backend, k):
    rng = np.random.default_rng(k)
    router = R.TopKRouter(k=k, noise=None)
    gate, x_np = rng.normal(size=(5, 7)), rng.normal(size=(3, 4, 5))
    ops = get_ops()
    r = router({"gate": ops.asarray(gate, "float32")}, ops.asarray(x_np, "float32"))
    logits = x_np @ gate
    expected = np.argsort(-logits, axis=-1)[..., :k]
    np.testing.assert_array_equal(to_numpy(r.indices), expected)
    p = np.take_along_axis(softmax_np(logits), expected, -1)
    np.testing.assert_allclose(to_numpy(r.weights), p / p.sum(-1, keepdims=True) if k > 1 else p, rtol=1e-5)
    assert r.weights.shape == r.indices.shape == (3, 4, k)


def test_ties_select_the_lowest_indices_on_every_backend():
    """Zero gates tie all experts: every backend picks experts 0..k-1 (tokens 0..c-1 for expert choice)."""
    for name in BACKENDS:
        with tensormoe.backend_context(name):
            ops = get_ops()
            x = ops.asarray(np.ones((5, 4)), "float32")
            layer = tensormoe.TTMMoE(4, 3, [6], ranks=2, router="top3")
            zero = {**layer.params, "gate_0": ops.asarray(np.zeros((4, 6)), "float32")}
            (r,) = layer.route(zero, x)
            np.testing.assert_array_equal(to_numpy(r.indices), np.tile([0, 1, 2], (5, 1)))
            choice = tensormoe.TTMMoE(4, 3, [6], ranks=2, router="expert_choice")
            (r,) = choice.route({**choice.params, "gate_0": zero["gate_0"]}, x)
            assert np.all(to_numpy(r.weights)[:2] > 0) and np.all(to_numpy(r.weights)[2:] == 0)  # c = 2


def test_selecting_routers_start_without_ties():
    """Top-k and expert choice gates start near zero but distinct: probabilities near uniform, no ties."""
    layer = tensormoe.CPMMoE(16, 3, [8], rank=2, router="top1")
    x = np.random.default_rng(0).normal(size=(200, 16)).astype("float32")
    with tensormoe.backend_context("numpy"):
        (r,) = layer.route(None, x)
    assert np.allclose(r.probs, 1 / 8, atol=0.01)
    assert len(np.unique(r.indices)) == 8
    assert np.all(to_numpy(layer.params["gate_noise_0"]) == 0)


def test_noisy_top_k_reference_and_reproducibility():
    """Training noise: logits + N(0,1) * softplus(x @ W_noise), drawn from the seed, the same on every backend."""
    rng = np.random.default_rng(0)
    layer = tensormoe.CPMMoE(5, 3, [8], rank=2, router="top2")
    x_np = rng.normal(size=(6, 5))
    with tensormoe.backend_context("numpy"):
        params = randomise_gates(layer, 3, scale=0.3)
    g, gn = (to_numpy(params[k]) for k in ("gate_0", "gate_noise_0"))
    noise = np.random.default_rng(42).standard_normal((1, 6, 8))[0]
    noisy = x_np @ g + noise * np.logaddexp(0.0, x_np @ gn)
    expected = np.argsort(-noisy, axis=-1)[:, :2]
    outputs = {}
    for name in BACKENDS:
        with tensormoe.backend_context(name):
            ops = get_ops()
            p = tensormoe.convert_params(params, name)
            x = ops.asarray(x_np, "float32")
            (r,) = layer.route(p, x, training=True, rng=42)
            np.testing.assert_array_equal(to_numpy(r.indices), expected)
            (clean,) = layer.route(p, x)  # eval mode: no noise
            np.testing.assert_array_equal(to_numpy(clean.indices), np.argsort(-(x_np @ g), axis=-1)[:, :2])
            outputs[name] = to_numpy(layer.apply(p, x, training=True, rng=42))
            with pytest.raises(ValueError, match="rng="):
                layer.apply(p, x, training=True)
    for y in outputs.values():
        np.testing.assert_allclose(y, outputs["numpy"], rtol=1e-4, atol=1e-5)


def test_framework_generators_are_accepted():
    layer = tensormoe.CPMMoE(3, 2, [4], rank=2, router="top1")
    x = np.ones((2, 3), dtype="float32")
    if "pytorch" in BACKENDS:
        import torch

        with tensormoe.backend_context("pytorch"):
            ys = [layer(torch.ones(2, 3), training=True, rng=torch.Generator().manual_seed(1)) for _ in range(2)]
            torch.testing.assert_close(ys[0], ys[1])
    if "jax" in BACKENDS:
        import jax

        with tensormoe.backend_context("jax"):
            r1 = layer.route(None, jax.numpy.asarray(x), training=True, rng=jax.random.key(0))
            r2 = layer.route(None, jax.numpy.asarray(x), training=True, rng=jax.random.key(0))
            np.testing.assert_array_equal(np.asarray(r1[0].logits), np.asarray(r2[0].logits))


def test_expert_choice_takes_the_top_tokens_of_each_expert(backend):
    rng = np.random.default_rng(5)
    router = R.ExpertChoiceRouter(capacity_factor=1.5)
    gate, x_np = rng.normal(size=(4, 6)), rng.normal(size=(2, 8, 4))
    mask = np.ones((2, 8), bool)
    mask[1, 5:] = False
    ops = get_ops()
    r = router({"gate": ops.asarray(gate, "float32")}, ops.asarray(x_np, "float32"), mask=ops.asarray(mask))
    c = router.capacity(8, 6)
    assert c == 2
    probs = softmax_np(x_np @ gate)
    w = to_numpy(r.weights)
    for g in range(2):
        scores = np.where(mask[g][:, None], probs[g], -1.0)
        for e in range(6):
            chosen = np.argsort(-scores[:, e], kind="stable")[:c]
            expected = np.zeros(8)
            expected[chosen] = probs[g, chosen, e] * mask[g, chosen]
            np.testing.assert_allclose(w[g, :, e], expected, rtol=1e-5, atol=1e-7)
    assert np.all(w[1, 5:] == 0)


def test_soft_moe_equals_its_dense_definition(backend):
    """y_t = sum_s C[t,s] W[s // p]^T (sum_t' D[t',s] x_t'), through the reconstructed W."""
    rng = np.random.default_rng(2)
    layer = tensormoe.TuckerMMoE(4, 3, [3], ranks=2, router=R.SoftRouter(slots_per_expert=2), seed=1)
    ops = get_ops()
    params = randomise_gates(layer, 1)
    x_np = rng.normal(size=(2, 5, 4))
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 1, 0]], bool)
    x = ops.asarray(x_np, "float32")
    y, (r,) = layer.apply(params, x, mask=ops.asarray(mask), return_routing=True)
    z = x_np @ to_numpy(params["gate_0"])  # [G, T, S]
    combine = softmax_np(z) * mask[..., None]
    dispatch = np.where(mask[..., None], np.exp(z - np.where(mask[..., None], z, -np.inf).max(1, keepdims=True)), 0)
    dispatch /= dispatch.sum(1, keepdims=True)
    w = to_numpy(layer.dense_weight(params))  # [N, I+1, O]
    slots = np.einsum("gts,gti->gsi", dispatch, np.concatenate([x_np, np.ones((2, 5, 1))], -1))
    y_slots = np.einsum("gsi,sio->gso", slots, w[np.arange(6) // 2])
    np.testing.assert_allclose(to_numpy(y), np.einsum("gts,gso->gto", combine, y_slots), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(to_numpy(r.dispatch), dispatch, rtol=1e-5, atol=1e-7)
    assert np.all(to_numpy(y)[1, [2, 4]] == 0)


@st.composite
def routed_layers(draw):
    levels = draw(st.integers(1, 3))
    names = draw(st.lists(st.sampled_from(["entmax15", "softmax", "sparsemax", "top1", "top2", "expert_choice",
                                           "soft"]), min_size=levels, max_size=levels))
    soft = [h for h, n in enumerate(names) if n == "soft"]
    names = [n if n != "soft" or h == (soft or [None])[0] else "top1" for h, n in enumerate(names)]
    return {
        "kind": draw(st.sampled_from(sorted(LAYERS))),
        "routers": names,
        "expert_dims": [draw(st.integers(2, 5)) for _ in range(levels)],
        "batch": tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))),
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(max_examples=25)
@given(cfg=routed_layers())
def test_any_hierarchy_of_routers_equals_the_dense_reference(cfg):
    """Every router mix, 1-3 levels, any batch shape: factorized forward == forward through W (NumPy, PyTorch)."""
    for name in [b for b in BACKENDS if b != "jax"]:
        with tensormoe.backend_context(name):
            layer = LAYERS[cfg["kind"]](4, 3, cfg["expert_dims"], 2, router=cfg["routers"], seed=cfg["seed"])
            params = randomise_gates(layer, cfg["seed"])
            ops = get_ops()
            x = ops.asarray(np.random.default_rng(cfg["seed"]).normal(size=(*cfg["batch"], 4)), "float32")
            y, routing = layer.apply(params, x, return_routing=True)
            y_ref = to_numpy(layer.dense_forward(params, x))
            scale = np.abs(y_ref).max() + 1
            np.testing.assert_allclose(to_numpy(y), y_ref, atol=1e-5 * scale)
            # the routing handed back reproduces the output
            np.testing.assert_allclose(to_numpy(layer.apply(params, x, routing=routing)), to_numpy(y), atol=1e-6 * scale)
            assert len(routing) == layer.hierarchy


def test_every_backend_routes_alike():
    cfg = {"routers": ["top2", "expert_choice", "soft"], "dims": [5, 4, 3]}
    x_np = np.random.default_rng(0).normal(size=(2, 6, 4))
    out = {}
    for name in BACKENDS:
        with tensormoe.backend_context(name):
            layer = tensormoe.TRMMoE(4, 3, cfg["dims"], ranks=2, router=cfg["routers"])
            params = randomise_gates(layer, 0)
            y, routing = layer.apply(params, get_ops().asarray(x_np, "float32"), return_routing=True)
            out[name] = (to_numpy(y), [to_numpy(r.weights) for r in routing], to_numpy(routing[0].indices))
    for name, (y, weights, indices) in out.items():
        np.testing.assert_allclose(y, out["numpy"][0], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(indices, out["numpy"][2])
        for w, w0 in zip(weights, out["numpy"][1]):
            np.testing.assert_allclose(w, w0, rtol=1e-4, atol=1e-6)


# -- auxiliary losses and statistics -----------------------------------------------------


@pytest.mark.parametrize("router", ["top1", "top2", "softmax", "sparsemax"])
def test_aux_losses_against_numpy_reference(backend, router):
    rng = np.random.default_rng(7)
    layer = tensormoe.CPMMoE(5, 3, [6], rank=2, router=R.get_router(router, gate_norm=None))
    params = randomise_gates(layer, 7)
    x_np = rng.normal(size=(3, 4, 5))
    mask = rng.random((3, 4)) < 0.7
    mask[0, 0] = True
    (r,) = layer.route(params, get_ops().asarray(x_np, "float32"), mask=get_ops().asarray(mask))
    z = (x_np @ to_numpy(params["gate_0"]))[mask]
    probs = to_numpy(r.probs)[mask]
    if router.startswith("top"):
        np.testing.assert_allclose(probs, softmax_np(z), rtol=1e-5)
        k = int(router[3:])
        assigned = np.zeros_like(probs)
        np.put_along_axis(assigned, np.argsort(-z, axis=-1)[:, :k], 1.0, axis=-1)
    else:
        assigned = (probs > 0).astype(float)
    f = assigned.sum(0) / assigned.sum()
    p = probs.mean(0)
    lse = np.log(np.exp(z).sum(-1))
    np.testing.assert_allclose(to_numpy(r.load), f, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(to_numpy(r.importance), p, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(to_numpy(r.load_balancing_loss)), 6 * np.sum(f * p), rtol=1e-5)
    np.testing.assert_allclose(float(to_numpy(r.z_loss)), np.mean(lse**2), rtol=1e-5)
    assert float(to_numpy(r.dropped)) == 0.0
    assert np.all(to_numpy(r.weights)[~mask] == 0)


@given(data=st.data())
def test_padding_does_not_change_losses(numpy_backend, data):
    """Losses with a mask equal the losses of the real tokens alone, whatever the padding holds."""
    name = data.draw(st.sampled_from(["top1", "top3", "entmax15", "expert_choice", "soft"]))
    seed = data.draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    n_real = data.draw(st.integers(1, 6))
    layer = tensormoe.CPMMoE(4, 2, [5], rank=2, router=name)
    params = randomise_gates(layer, seed)
    x = rng.normal(size=(1, 6 + 3, 4)).astype(np.float32)
    x_pad = x.copy()
    x_pad[0, n_real:] = 100 * rng.normal(size=(9 - n_real, 4))
    mask = np.zeros((1, 9), bool)
    mask[0, :n_real] = True
    (masked,) = layer.route(params, x_pad, mask=mask)
    (alone,) = layer.route(params, x[:, :n_real])
    fields = ["z_loss", "importance"]
    if name != "expert_choice":  # expert choice's capacity grows with the group size, padding included
        fields += ["load", "load_balancing_loss", "dropped", "weights"]
    for field in fields:
        got = getattr(masked, field)
        got = got[:, :n_real] if field == "weights" else got
        np.testing.assert_allclose(got, getattr(alone, field), rtol=1e-4, atol=1e-6, err_msg=field)


def test_load_balancing_loss_is_one_when_balanced_and_n_when_collapsed(numpy_backend):
    router = R.TopKRouter(k=1, noise=None)
    x = np.eye(4)
    balanced = router({"gate": 50 * np.eye(4)}, x)
    collapsed = router({"gate": 50 * np.tile([1.0, 0, 0, 0], (4, 1))}, x + 1)
    np.testing.assert_allclose(balanced.load_balancing_loss, 1.0, rtol=1e-6)
    np.testing.assert_allclose(collapsed.load_balancing_loss, 4.0, rtol=1e-6)
    np.testing.assert_allclose(collapsed.load, [1, 0, 0, 0])


def test_expert_choice_reports_dropped_tokens(numpy_backend):
    router = R.ExpertChoiceRouter(capacity_factor=1.0)
    x = np.array([[5.0, 0.0], [4.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    r = router({"gate": np.eye(2)}, x)  # capacity 2: expert 0 takes rows 0, 1; expert 1 takes rows 3 and 2
    assert float(r.dropped) == 0.0
    r = R.ExpertChoiceRouter(capacity_factor=0.5)({"gate": np.eye(2)}, x)  # capacity 1: rows 1, 2 dropped
    assert float(r.dropped) == 0.5


# -- training --------------------------------------------------------------------------


@pytest.mark.skipif("pytorch" not in BACKENDS, reason="needs PyTorch")
def test_sparse_path_gradients_match_finite_differences():
    import torch

    with tensormoe.backend_context("pytorch"):
        layer = tensormoe.TRMMoE(3, 2, [5, 3], ranks=2, dtype="float64", router=["top2", "top1"])
        params = {k: v.clone().requires_grad_(True) for k, v in randomise_gates(layer, 0).items()}
        x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        names = [k for k in params if k.startswith("factor")]

        def f(*factors):
            p = {**params, **dict(zip(names, factors))}
            return layer.apply(p, x)

        assert torch.autograd.gradcheck(f, [params[k] for k in names])
        # the router gets gradients through the selected weights, and through the aux losses
        y, routing = layer.apply(params, x, return_routing=True, training=True, rng=0)
        (y.square().mean() + R.aux_loss(routing)).backward()
        for name in ("gate_0", "gate_noise_0", "gate_1"):
            assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name


@pytest.mark.skipif("jax" not in BACKENDS, reason="needs JAX")
def test_routing_is_a_jax_pytree_under_grad():
    import jax

    with tensormoe.backend_context("jax"):
        layer = tensormoe.CPMMoE(3, 2, [4], rank=2, router="top2")
        x = jax.numpy.ones((5, 3))

        def loss(params):
            y, routing = layer.apply(params, x, return_routing=True)
            return (y**2).mean() + R.aux_loss(routing)

        grads = jax.grad(loss)(layer.params)
        assert set(grads) == set(layer.params)
        assert all(np.all(np.isfinite(np.asarray(g))) for g in grads.values())


# -- errors ----------------------------------------------------------------------------


def test_errors_name_the_argument(numpy_backend):
    with pytest.raises(ValueError, match="router='top-2'"):
        tensormoe.CPMMoE(3, 2, [4], rank=2, router="top-2")
    with pytest.raises(ValueError, match="k=5 exceeds the 4 experts"):
        tensormoe.CPMMoE(3, 2, [4], rank=2, router="top5")
    with pytest.raises(ValueError, match="one router per level"):
        tensormoe.CPMMoE(3, 2, [4, 2], rank=2, router=["top1"])
    with pytest.raises(ValueError, match="at most one level"):
        tensormoe.CPMMoE(3, 2, [4, 2], rank=2, router=["soft", "soft"])
    with pytest.raises(ValueError, match="capacity_factor"):
        R.ExpertChoiceRouter(capacity_factor=0)
    with pytest.raises(ValueError, match="noise"):
        R.TopKRouter(noise=-1.0)
    layer = tensormoe.CPMMoE(3, 2, [4], rank=2, router="top2")
    x = np.ones((2, 3), dtype="float32")
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 4\)"):
        layer.apply(None, x, routing=[R.Routing(np.ones((2, 1), "float32"), np.array([[4], [0]]))])
    with pytest.raises(ValueError, match="mask must have shape"):
        layer.apply(None, x, mask=np.ones(3, bool))
    with pytest.raises(ValueError, match="mask must hold booleans"):
        layer.apply(None, x, mask=np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="coefficients= or routing="):
        layer.apply(None, x, coefficients=[np.ones((2, 4), "float32")], routing=layer.route(None, x))
    with pytest.raises(ValueError, match="Soft MoE"):
        tensormoe.CPMMoE(3, 2, [4], rank=2, router="soft").coefficients(None, x)


# -- the example ------------------------------------------------------------------------


def test_compare_routers_example_quick(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "examples" / "compare_routers.py"
    spec = importlib.util.spec_from_file_location("compare_routers", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    plot = tmp_path / "routers.png"
    rows = example.main(["--quick", "--plot", str(plot)])
    assert [r["router"] for r in rows] == example.ROUTERS
    assert plot.stat().st_size > 0
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["entropy"] <= 1.0 + 1e-9
        assert r["params"] <= 2048  # the same budget for every router
    active = {r["router"]: r["active"] for r in rows}
    assert active["top1"] == 1.0 and active["top2"] == 2.0 and active["softmax"] == 16.0
