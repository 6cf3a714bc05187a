"""Issue 19's routing features on every installed backend, against ``tests/routing_reference.py``.

* top-k capacity (position order, slot-major), the second-expert policies, the dropped-token counts;
* the product-key router's joint top-k against the brute-force sort of all ``n * n`` summed scores;
* the joint gathered contraction (``joint=(0, 1)``) of every factorization against a loop over the
  selected pairs of the dense ``W`` (float64), and that unselected experts' rows are never read.

The references are float64 NumPy written from the spec; nothing here copies numbers from the code
under test.  Logits are multiples of 1/8 (exact in float32, ties included), so JAX in float32 selects
the same experts as the float64 reference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import routing_reference as ref
from helpers import BACKENDS, to_numpy
from hypothesis import given, settings
from hypothesis import strategies as st

import tensormoe
from tensormoe import routing as R
from tensormoe.frameworks import get_ops
from tensormoe.network.contraction import execute

PROBS = np.array([[0.6, 0.3, 0.1], [0.5, 0.1, 0.4], [0.7, 0.2, 0.1], [0.2, 0.5, 0.3]])
LOGITS = np.log(PROBS)
TOP2_WEIGHTS = np.array([[2 / 3, 1 / 3], [5 / 9, 4 / 9], [7 / 9, 2 / 9], [5 / 8, 3 / 8]])


def _dtype(backend):
    return "float32" if backend == "jax" else "float64"


def _route(router, logits, backend, mask=None, **kwargs):
    """``router`` on logits ``[..., N]`` given as the input (the gate is the identity); under ``jax.jit`` on JAX."""
    ops = get_ops()
    n = logits.shape[-1]
    gate = {"gate": ops.asarray(np.eye(n), _dtype(backend))}
    x = ops.asarray(logits, _dtype(backend))
    if backend == "jax":  # one compilation instead of one per operation
        import jax

        return jax.jit(lambda gate, x, mask: router(gate, x, mask=mask, **kwargs))(gate, x, mask)
    return router(gate, x, mask=mask, **kwargs)


def _np(routing, name):
    return to_numpy(getattr(routing, name))


# -- top-k capacity and second-expert policies: hand cases -------------------------------------------


def test_top1_capacity_keeps_the_earliest_tokens(backend):
    probs = np.array([[0.5, 0.25, 0.25], [0.6, 0.2, 0.2], [0.8, 0.1, 0.1], [0.1, 0.7, 0.2]])
    router = R.TopKRouter(k=1, noise=None, capacity_factor=0.75, min_capacity=1)  # floor(4 * 0.75 / 3) = 1
    r = _route(router, np.log(probs), backend)
    assert _np(r, "kept")[:, 0].tolist() == [1, 0, 0, 1]  # position order: token 2 has the top gate, and no place
    np.testing.assert_allclose(_np(r, "weights")[:, 0], [0.5, 0.0, 0.0, 0.7], atol=1e-6)
    assert (float(r.over_capacity), float(r.dropped_tokens), float(r.dropped)) == (2.0, 2.0, 0.5)


def test_top2_capacity_places_every_first_choice_before_any_second(backend):
    router = R.TopKRouter(k=2, noise=None, capacity_factor=1.5, min_capacity=1)  # 2 places per expert
    r = _route(router, LOGITS, backend)
    assert _np(r, "kept").tolist() == [[1, 1], [1, 1], [0, 0], [1, 1]]
    np.testing.assert_allclose(_np(r, "weights"), TOP2_WEIGHTS * [[1], [1], [0], [1]], atol=1e-6)
    assert (float(r.over_capacity), float(r.dropped_tokens)) == (2.0, 1.0)
    assert _np(r, "load").tolist() == [3 / 8, 3 / 8, 2 / 8]  # what the router asked for: capacity leaves it alone


@pytest.mark.parametrize(
    ("policy", "threshold", "second_kept"),
    [("all", 0.2, [1, 1, 1, 1]), ("none", 0.2, [0, 0, 0, 0]), ("threshold", 0.3, [1, 1, 0, 1])],
)
def test_second_policies_on_the_renormalised_second_weight(backend, policy, threshold, second_kept):
    r = _route(R.TopKRouter(k=2, noise=None, second_policy=policy, second_threshold=threshold), LOGITS, backend)
    if policy == "all":
        assert r.kept is None and float(r.dropped) == 0.0
    else:
        assert _np(r, "kept").tolist() == [[1, s] for s in second_kept]
    np.testing.assert_allclose(_np(r, "weights"), TOP2_WEIGHTS * [[1, s] for s in second_kept], atol=1e-6)


def test_random_policy_draws_one_uniform_per_token_from_rng(backend):
    # the router draws U[0, 1) [G, T] from the seed (after any noise: none here), on every backend alike
    x = np.stack([LOGITS, LOGITS[::-1]])  # two groups of four tokens
    router = R.TopKRouter(k=2, noise=None, second_policy=("threshold", "random"), second_threshold=(0.9, 0.4))
    r = _route(router, x, backend, rng=7)
    uniform = np.random.default_rng(7).random((2, 4))
    for g in range(2):
        want = ref.top_k(x[g], 2, policy="random", threshold=0.4, uniform=uniform[g])
        assert _np(r, "kept")[g].tolist() == want["kept"].tolist()
    trained = _route(router, x, backend, training=True)  # threshold 0.9 in training: no draw, no second expert
    assert _np(trained, "kept")[..., 1].sum() == 0
    with pytest.raises(ValueError, match=r"second_policy='random' of 'top2' at level 0\) and needs rng="):
        _route(router, x, backend)


def test_a_slot_the_policy_removes_takes_no_place(backend):
    router = R.TopKRouter(k=2, noise=None, second_policy="threshold", second_threshold=0.3, capacity_factor=0.75,
                          min_capacity=1)
    r = _route(router, LOGITS, backend)
    assert _np(r, "kept").tolist() == [[1, 0], [0, 1], [0, 0], [1, 0]]
    np.testing.assert_allclose(_np(r, "weights"), [[2 / 3, 0], [0, 4 / 9], [0, 0], [5 / 8, 0]], atol=1e-6)
    assert (float(r.over_capacity), float(r.dropped_tokens)) == (4.0, 1.0)


def test_padding_takes_no_place_and_counts_nowhere(backend):
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.2, 0.2], [0.7, 0.2, 0.1]])
    router = R.TopKRouter(k=1, noise=None, capacity_factor=1.0, min_capacity=1)
    ops = get_ops()
    r = _route(router, np.log(probs), backend, mask=ops.asarray(np.array([False, True, True])))
    assert _np(r, "kept")[:, 0].tolist() == [0, 1, 0]
    assert (float(r.over_capacity), float(r.dropped_tokens), float(r.dropped)) == (1.0, 1.0, 0.5)


def test_capacity_of_each_mode():
    router = R.TopKRouter(k=2, capacity_factor=(1.25, 2.0))
    assert [router.capacity(1024, 16, t) for t in (True, False)] == [ref.capacity(1024, 16, f) for f in (1.25, 2.0)]
    for tokens, experts, factor, least in [(64, 16, 1.25, 4), (10, 3, 1.0, 1), (2, 16, 2.0, 4), (4, 3, 9.0, 1)]:
        r = R.TopKRouter(capacity_factor=factor, min_capacity=least)
        assert r.capacity(tokens, experts) == ref.capacity(tokens, experts, factor, least)
    assert R.TopKRouter().capacity(64, 16) is None
    gshard = R.get_router("gshard")
    assert (gshard.k, gshard.noise, gshard.second_policy, gshard.min_capacity) == (2, None, ("random", "random"), 4)


# -- top-k: the reference on random groups, every backend, under jax.jit ------------------------------


@st.composite
def top_k_cases(draw):
    groups, tokens, experts = draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(2, 6))
    k = draw(st.integers(1, min(2, experts)))
    policies = ["all", "none", "threshold", "random"] if k == 2 else ["all"]
    return {
        "groups": groups, "tokens": tokens, "experts": experts, "k": k,
        "policy": draw(st.sampled_from(policies)), "threshold": draw(st.sampled_from([0.15, 0.3, 0.45])),
        "factor": draw(st.one_of(st.none(), st.sampled_from([0.5, 1.0, 1.25, 2.0]))),
        "min_capacity": draw(st.integers(1, 3)), "masked": draw(st.booleans()), "training": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


def _check_top_k_case(case, backend, jit=False):
    rng = np.random.default_rng(case["seed"])
    g, t, n, k = case["groups"], case["tokens"], case["experts"], case["k"]
    logits = rng.integers(-16, 17, size=(g, t, n)) / 8.0  # exact in float32, with ties
    valid = rng.random((g, t)) < 0.8 if case["masked"] else np.ones((g, t), bool)
    mode = 0 if case["training"] else 1
    other = {"all": "all", "none": "all", "threshold": "none", "random": "threshold"}[case["policy"]]
    pair = (case["policy"], other) if mode == 0 else (other, case["policy"])  # the other mode's setting is unused
    factor = case["factor"]
    router = R.TopKRouter(k=k, noise=None, second_policy=pair if k == 2 else "all", second_threshold=case["threshold"],
                          capacity_factor=None if factor is None else ((factor, 9.0) if mode == 0 else (9.0, factor)),
                          min_capacity=case["min_capacity"])
    uniform = np.random.default_rng(case["seed"]).random((g, t))
    ops = get_ops()
    x = ops.asarray(logits, _dtype(backend))
    params = {"gate": ops.asarray(np.eye(n), _dtype(backend))}
    mask = ops.asarray(valid.astype(np.float64), _dtype(backend)) if case["masked"] else None

    def run(params, x, mask):
        grouped_mask = None if mask is None else mask
        draws = R.training_noise(ops, [router], [n], (g, t), case["seed"], like=x, training=case["training"])
        draw = draws[0] if draws is not None else None
        routing = router.route(ops, params, x, grouped_mask, uniform=None if draw is None else draw.uniform,
                               training=case["training"])
        return R.routing.with_statistics(ops, routing, grouped_mask, n)

    if jit:
        import jax

        r = jax.jit(run)(params, x, mask)
    else:
        r = run(params, x, mask)
    cap = ref.capacity(t, n, factor, case["min_capacity"]) if factor is not None else None
    totals = {"over_capacity": 0, "dropped_tokens": 0}
    for group in range(g):
        want = ref.top_k(logits[group], k, policy=case["policy"], threshold=case["threshold"], uniform=uniform[group],
                         cap=cap, valid=valid[group])
        assert to_numpy(r.indices[group]).tolist() == want["indices"].tolist()
        np.testing.assert_allclose(to_numpy(r.weights[group]), want["weights"], atol=1e-6)
        kept = to_numpy(r.kept[group]) if r.kept is not None else np.ones((t, k)) * valid[group][:, None]
        assert kept.tolist() == want["kept"].tolist()
        for name in totals:
            totals[name] += want[name]
    assert float(r.dropped_tokens) == totals["dropped_tokens"]
    if r.over_capacity is not None:
        assert float(r.over_capacity) == totals["over_capacity"]
    else:
        assert totals["over_capacity"] == 0
    np.testing.assert_allclose(float(r.dropped), totals["dropped_tokens"] / max(1, valid.sum()), atol=1e-6)


#: examples per backend: JAX runs the routing under jax.jit (one compilation per shape; eager JAX would
#: compile every primitive of it), which the hand cases above run eagerly
EXAMPLES = {"numpy": 25, "pytorch": 25, "jax": 3}


def test_top_k_equals_the_reference(backend):
    @settings(max_examples=EXAMPLES[backend])
    @given(case=top_k_cases())
    def check(case):
        _check_top_k_case(case, backend, jit=backend == "jax")

    check()


def test_invalid_options_name_the_argument():
    with pytest.raises(ValueError, match=r"second_policy='none' needs k=2.*got k=1"):
        R.TopKRouter(k=1, second_policy="none")
    with pytest.raises(ValueError, match=r"second_policy\[1\]='sometimes' is not supported"):
        R.TopKRouter(k=2, second_policy=("all", "sometimes"))
    with pytest.raises(ValueError, match=r"capacity_factor must be a positive finite number; got -1.0"):
        R.TopKRouter(capacity_factor=-1.0)
    with pytest.raises(ValueError, match=r"capacity_factor must be one value or a pair"):
        R.TopKRouter(capacity_factor=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match=r"overflow='residual' is not supported"):
        R.TopKRouter(overflow="residual")
    with pytest.raises(ValueError, match=r"min_capacity must be a positive integer; got 0"):
        R.TopKRouter(min_capacity=0)
    with pytest.raises(ValueError, match=r"in_dim == out_dim; got in_dim=4 and out_dim=3"):
        R.resolve_routers(R.TopKRouter(capacity_factor=1.0, overflow="pass-through"), [5], "entmax15", None,
                          in_dim=4, out_dim=3)
    with pytest.raises(ValueError, match=r"disagree on overflow"):
        R.resolve_routers([R.TopKRouter(capacity_factor=1.0, overflow="pass-through"),
                           R.TopKRouter(capacity_factor=1.0)], [5, 5], "entmax15", None)


def test_pass_through_marks_only_tokens_no_expert_processes(backend):
    router = R.TopKRouter(k=2, noise=None, second_policy="threshold", second_threshold=0.3, capacity_factor=0.75,
                          min_capacity=1, overflow="pass-through")
    ops = get_ops()
    x = ops.asarray(LOGITS, _dtype(backend))
    d = R.dispatch(ops, [router], {"gate_0": ops.asarray(np.eye(3), _dtype(backend))}, [3], x)
    # token 2 keeps no slot; token 1 keeps only its second, and is not passed through
    assert to_numpy(R.pass_through(ops, [router], d))[:, 0].tolist() == [0, 0, 1, 0]
    mask = ops.asarray(np.array([1.0, 1.0, 0.0, 1.0]), _dtype(backend))
    d = R.dispatch(ops, [router], {"gate_0": ops.asarray(np.eye(3), _dtype(backend))}, [3], x, mask=mask)
    assert to_numpy(R.pass_through(ops, [router], d, mask))[:, 0].tolist() == [0, 0, 0, 0]  # padding stays out
    assert R.pass_through(ops, [R.TopKRouter(capacity_factor=1.0)], d) is None


def test_uniform_draws_are_the_same_on_every_backend_from_a_seed(backend):
    ops = get_ops()
    like = ops.asarray(np.zeros(1), _dtype(backend))
    draw, _ = ops.uniform(3, (2, 5), like)
    np.testing.assert_allclose(to_numpy(draw), np.random.default_rng(3).random((2, 5)), rtol=1e-6)
    if backend == "pytorch":
        import torch

        native, _ = ops.uniform(torch.Generator().manual_seed(0), (1000,), like)
    elif backend == "jax":
        import jax

        native, _ = ops.uniform(jax.random.key(0), (1000,), like)
    else:
        native, _ = ops.uniform(np.random.default_rng(0), (1000,), like)
    values = to_numpy(native)
    assert values.min() >= 0 and values.max() < 1 and 0.4 < values.mean() < 0.6


def test_ops_top_k_is_a_stable_sort_on_every_backend(backend):
    # PyTorch selects few-of-many with torch.topk and then settles ties at the k-th value by index
    ops = get_ops()
    rng = np.random.default_rng(9)
    for trial in range(15 if backend == "jax" else 60):  # eager JAX compiles every new shape
        n = int(rng.integers(1, 70))
        k = int(rng.integers(1, n + 1)) if trial % 2 else int(rng.integers(1, max(2, n // 4 + 1)))
        x = rng.integers(-3, 4, size=(4, n)).astype(np.float32) if trial % 3 else rng.normal(size=(4, n))
        x[0, ::2] = np.inf if trial % 4 else -np.inf
        values, index = ops.top_k(ops.asarray(x, _dtype(backend)), k)
        want = np.argsort(-x, axis=-1, kind="stable")[:, :k]
        assert to_numpy(index).tolist() == want.tolist()
        np.testing.assert_array_equal(to_numpy(values), np.take_along_axis(x.astype(_dtype(backend)), want, -1))


# -- the layer with capacity: dropped tokens output zero, unselected experts are never read ---------


def test_layer_with_capacity_drops_to_zero_and_reads_only_selected_experts(backend):
    rng = np.random.default_rng(5)
    n, in_dim, out_dim, tokens = 8, 4, 3, 10
    router = R.TopKRouter(k=2, noise=None, capacity_factor=1.0, min_capacity=1)  # 1 place per expert: drops
    with tensormoe.backend_context("numpy"):
        layer = tensormoe.CPMMoE(in_dim, out_dim, [n], rank=3, router=router, dtype="float64", bias=True)
        params = {k: rng.normal(size=v.shape) for k, v in layer.params.items()}
        params["gate_0"] = rng.integers(-8, 9, size=(in_dim, n)) / 8.0
    x = rng.integers(-8, 9, size=(tokens, in_dim)) / 4.0
    x[:, 0] = 1.0
    params["gate_0"][0, -1], params["gate_0"][1:, -1] = -10.0, 0.0  # no token selects the last expert
    logits = x @ params["gate_0"]
    want = ref.top_k(logits, 2, cap=ref.capacity(tokens, n, 1.0, 1))
    assert want["dropped_tokens"] > 0 and want["over_capacity"] > 0  # the case exercises dropping
    weight = np.einsum("nr,ir,or->nio", params["factor_0"], params["factor_1"], params["factor_2"])
    xin = np.concatenate([x, np.ones((tokens, 1))], axis=1)
    outputs = np.einsum("ti,nio->tno", xin, weight)
    expected = ref.combine(want, outputs, x, "zero")
    unselected = sorted(set(range(n)) - set(want["indices"].ravel().tolist()))
    poisoned = dict(params)
    poisoned["factor_0"] = params["factor_0"].copy()
    poisoned["factor_0"][unselected] = np.nan  # no token selects these: the gather must not read them
    ops = get_ops()
    dtype = _dtype(backend)
    for p in (params, poisoned):
        y, (r,) = layer.apply({k: ops.asarray(v, dtype) for k, v in p.items()}, ops.asarray(x, dtype),
                              return_routing=True, backend=backend)
        np.testing.assert_allclose(to_numpy(y), expected, rtol=1e-4, atol=1e-4)
        assert float(r.dropped_tokens) == want["dropped_tokens"]
    assert n - 1 in unselected


# -- product keys ---------------------------------------------------------------------------------------


def _pk_params(backend, case):
    ops = get_ops()
    dtype = _dtype(backend)
    return [{"query": ops.asarray(case[f"query{level}"], dtype), "keys": ops.asarray(case[f"keys{level}"], dtype)}
            for level in (0, 1)]


def test_product_keys_by_hand(backend):
    one = np.ones((1, 1))
    case = {"query0": one, "query1": one, "keys0": np.array([1.0, 3.0]).reshape(1, 2, 1),
            "keys1": np.array([2.0, 0.0]).reshape(1, 2, 1)}
    ops = get_ops()
    router, params, x = R.ProductKeyRouter(k=2, key_dim=1), _pk_params(backend, case), ops.asarray(one, _dtype(backend))
    if backend == "jax":
        import jax

        first, second = jax.jit(router)(params, x)
    else:
        first, second = router(params, x)
    # scores e = 2i + j: [3, 1, 5, 3]; the tie 3 = 3 goes to expert 0, not 3
    assert (_np(first, "indices").tolist(), _np(second, "indices").tolist()) == ([[1, 0]], [[0, 0]])
    np.testing.assert_allclose(_np(first, "weights"), [[1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2))]], atol=1e-6)
    assert np.array_equal(_np(first, "weights"), _np(second, "weights"))
    # each level's dense coefficients are its marginal; the pairs are what the layer contracts
    np.testing.assert_allclose(to_numpy(first.to_dense(2)), [[_np(first, "weights")[0, 1], _np(first, "weights")[0, 0]]],
                               atol=1e-6)
    np.testing.assert_allclose(to_numpy(R.pair_to_dense(first, second, 2, 2))[0],
                               [[_np(first, "weights")[0, 1], 0.0], [_np(first, "weights")[0, 0], 0.0]], atol=1e-6)


@st.composite
def product_key_cases(draw):
    n = draw(st.integers(1, 6))
    k = draw(st.integers(1, n))
    return {"n": n, "k": k, "k_half": draw(st.integers(k, n)), "heads": draw(st.integers(1, 3)),
            "key_dim": draw(st.integers(1, 3)), "in_dim": draw(st.integers(1, 4)), "rows": draw(st.integers(1, 5)),
            "score": draw(st.sampled_from(["softmax", "relu"])), "ties": draw(st.booleans()),
            "seed": draw(st.integers(0, 2**16))}


def _check_product_keys(case, backend, jit=False):
    rng = np.random.default_rng(case["seed"])
    heads, dk, n, d = case["heads"], case["key_dim"], case["n"], case["in_dim"]
    # small integers give many tied sums; otherwise multiples of 1/8 (all exact in float32)
    scale = 1.0 if case["ties"] else 1 / 8
    span = 2 if case["ties"] else 16
    draw = lambda *shape: rng.integers(-span, span + 1, size=shape) * scale  # noqa: E731
    x = draw(case["rows"], d)
    ref_case = {"query0": draw(d, heads * dk), "query1": draw(d, heads * dk), "keys0": draw(heads, n, dk),
                "keys1": draw(heads, n, dk)}
    want = ref.product_key_brute_force(x, **ref_case, k=case["k"], score=case["score"])
    router = R.ProductKeyRouter(k=case["k"], heads=heads, key_dim=dk, k_half=case["k_half"], score=case["score"])
    ops = get_ops()
    params = _pk_params(backend, ref_case)
    xs = ops.asarray(x, _dtype(backend))
    if jit:
        import jax

        first, second = jax.jit(lambda p, x: router(p, x))(params, xs)
    else:
        first, second = router(params, xs)
    assert _np(first, "indices").tolist() == want["level0"].tolist()
    assert _np(second, "indices").tolist() == want["level1"].tolist()
    np.testing.assert_allclose(_np(first, "weights"), want["weights"], rtol=1e-5, atol=1e-5)
    assert float(first.dropped) == 0.0 and first.kept is None


def test_product_keys_equal_the_brute_force_top_k_over_all_pairs(backend):
    @settings(max_examples=EXAMPLES[backend])
    @given(case=product_key_cases())
    def check(case):
        _check_product_keys(case, backend, jit=backend == "jax")

    check()


def test_product_key_router_checks_its_levels():
    with pytest.raises(ValueError, match=r"k_half=2 must be at least k=3"):
        R.ProductKeyRouter(k=3, k_half=2)
    with pytest.raises(ValueError, match=r"equal size \[n, n\]; got expert_dims=\[4, 4, 4\]"):
        R.resolve_routers(R.ProductKeyRouter(k=2), [4, 4, 4], "entmax15", None)
    with pytest.raises(ValueError, match=r"k_half=4 need k <= k_half <= n, the 3 sub-keys"):
        R.resolve_routers(R.ProductKeyRouter(k=2, k_half=4), [3, 3], "entmax15", None)
    with pytest.raises(ValueError, match=r"not in a list"):
        R.resolve_routers([R.ProductKeyRouter(k=2)] * 2, [4, 4], "entmax15", None)
    with pytest.raises(ValueError, match=r"query_norm='batchnorm' is not available yet"):
        R.ProductKeyRouter(query_norm="batchnorm")
    router = R.ProductKeyRouter(k=2, heads=3, key_dim=4)
    assert router.param_shapes(10, 7) == {"query": (10, 12), "keys": (3, 7, 4)}
    assert R.resolve_routers("product_keys", [16, 16], "entmax15", None)[0].joint
    assert R.ProductKeyRouter(rank=2).param_shapes(10, 7) == {"query_down": (10, 2), "query_up": (2, 5),
                                                             "keys": (1, 7, 5)}


# -- the joint gathered contraction of every factorization ------------------------------------------------

FACTORIZATIONS = {
    "cp": lambda dims, r, h: tensormoe.CP(dims, rank=r, n_expert_modes=h),
    "tucker": lambda dims, r, h: tensormoe.Tucker(dims, ranks=r, n_expert_modes=h),
    "tt": lambda dims, r, h: tensormoe.TT(dims, ranks=r, n_expert_modes=h),
    "tr": lambda dims, r, h: tensormoe.TR(dims, ranks=r, n_expert_modes=h),
}


@st.composite
def joint_cases(draw):
    return {"kind": draw(st.sampled_from(sorted(FACTORIZATIONS))), "n": draw(st.integers(1, 5)),
            "third": draw(st.sampled_from([None, "dense", "sparse"])), "in_dim": draw(st.integers(1, 4)),
            "out_dim": draw(st.integers(1, 4)), "rank": draw(st.integers(1, 3)), "rows": draw(st.integers(1, 4)),
            "slots": draw(st.integers(1, 5)), "seed": draw(st.integers(0, 2**16))}


def _check_joint_contraction(case, backend):
    rng = np.random.default_rng(case["seed"])
    n, b, m = case["n"], case["rows"], case["slots"]
    extra = [] if case["third"] is None else [3]
    dims = [n, n, *extra, case["in_dim"], case["out_dim"]]
    f = FACTORIZATIONS[case["kind"]](dims, case["rank"], 2 + len(extra))
    params = {name: rng.normal(size=shape) for name, shape in f.param_shapes().items()}
    x = rng.normal(size=(b, case["in_dim"]))
    first, second = rng.integers(0, n, size=(b, m)), rng.integers(0, n, size=(b, m))  # repeated pairs too
    w = rng.normal(size=(b, m))
    with tensormoe.backend_context("numpy"):
        weight = to_numpy(f.to_dense(params))  # W[n, n, (3,) I, O] in float64
    ops = get_ops()
    dtype = _dtype(backend)
    indices = {0: ops.asarray(first), 1: ops.asarray(second)}
    coefficients = [ops.asarray(w, dtype)]
    if case["third"] is None:
        want = ref.paired_output(weight, x, first, second, w)
    else:
        if case["third"] == "dense":
            third = rng.normal(size=(b, 3))
            coefficients.append(ops.asarray(third, dtype))
        else:
            third_index, third_w = rng.integers(0, 3, size=(b, 2)), rng.normal(size=(b, 2))
            indices[2] = ops.asarray(third_index)
            coefficients.append(ops.asarray(third_w, dtype))
            third = np.zeros((b, 3))
            for row in range(b):
                for j in range(2):
                    third[row, third_index[row, j]] += third_w[row, j]
        mixed = np.einsum("bl,nmlio->bnmio", third, weight)
        want = np.stack([ref.paired_output(mixed[row], x[row:row + 1], first[row:row + 1], second[row:row + 1],
                                           w[row:row + 1])[0] for row in range(b)])
    sparse = [True, True] + ([case["third"] == "sparse"] if extra else [])
    # the joint weights (once, as level 0's operand), the third level's coefficients, x, the gathered parameters
    operands = [*coefficients, ops.asarray(x, dtype),
                *f.gather_params({k: ops.asarray(v, dtype) for k, v in params.items()}, indices, ops, joint=(0, 1))]
    y = execute(ops, f.routed_equation(sparse, joint=(0, 1)), operands)
    scale = 1 + np.abs(want).max()
    np.testing.assert_allclose(to_numpy(y), want, rtol=0, atol=(1e-4 if dtype == "float32" else 1e-9) * scale)
    # only the selected tuples' rows are read: B * m of them per joined factor
    for name, value in zip(f.network(), f.gather_params(params, {0: first, 1: second}, get_ops("numpy"),
                                                         joint=(0, 1))):
        letters = f.network()[name]
        if f.mode_symbol(0) in letters or f.mode_symbol(1) in letters:
            assert value.shape[:2] == (b, m)


def test_joint_contraction_equals_the_loop_over_selected_pairs(backend):
    # eager JAX compiles each new contraction: a few examples there, every format on NumPy and PyTorch
    @settings(max_examples={"numpy": 25, "pytorch": 12, "jax": 2}[backend])
    @given(case=joint_cases())
    def check(case):
        _check_joint_contraction(case, backend)

    check()


def test_joint_contraction_never_reads_unselected_pairs():
    f = tensormoe.TR([4, 4, 3, 2], ranks=2, n_expert_modes=2)
    rng = np.random.default_rng(0)
    params = {name: rng.normal(size=shape) for name, shape in f.param_shapes().items()}
    first, second = np.array([[0, 2]]), np.array([[1, 1]])
    poisoned = {k: v.copy() for k, v in params.items()}
    poisoned["factor_0"][:, [1, 3]] = np.inf  # level-0 sub-keys nobody selected
    poisoned["factor_1"][:, [0, 2, 3]] = np.nan
    ops = get_ops("numpy")
    x, w = rng.normal(size=(1, 3)), np.array([[0.25, 0.75]])
    outs = []
    for p in (params, poisoned):
        operands = [w, x, *f.gather_params(p, {0: first, 1: second}, ops, joint=(0, 1))]
        outs.append(execute(ops, f.routed_equation([True, True], joint=(0, 1)), operands))
    assert np.isfinite(outs[1]).all()
    np.testing.assert_array_equal(outs[0], outs[1])


def test_joint_equations():
    f = tensormoe.CP([4, 4, 5, 6], rank=3, n_expert_modes=2)
    # one selection letter for both levels, the weights once
    assert f.routed_equation([True, True], joint=(0, 1)) == "aj,ad,ajf,ajf,df,ef->ae"
    assert f.dense_equation(joint=(0, 1)) == "abc,ad,bcde->ae"
    with pytest.raises(ValueError, match=r"joins sparse levels only"):
        f.routed_equation([True, False], joint=(0, 1))
    with pytest.raises(ValueError, match=r"two or more distinct expert levels in \[0, 2\); got \(0, 2\)"):
        f.routed_equation([True, True], joint=(0, 2))


# -- the layers (phase 2b): product keys through the joint contraction, capacity per mode, pass-through ---

LAYER_CLASSES = {
    "cp": lambda i, o, dims, r, **kw: tensormoe.CPMMoE(i, o, dims, rank=r, **kw),
    "tucker": lambda i, o, dims, r, **kw: tensormoe.TuckerMMoE(i, o, dims, ranks=r, **kw),
    "tt": lambda i, o, dims, r, **kw: tensormoe.TTMMoE(i, o, dims, ranks=r, **kw),
    "tr": lambda i, o, dims, r, **kw: tensormoe.TRMMoE(i, o, dims, ranks=r, **kw),
}


@st.composite
def product_key_layers(draw):
    n = draw(st.integers(1, 4))
    k = draw(st.integers(1, n))
    return {"kind": draw(st.sampled_from(sorted(LAYER_CLASSES))), "n": n, "k": k, "k_half": draw(st.integers(k, n)),
            "heads": draw(st.integers(1, 2)), "key_dim": draw(st.integers(1, 2)), "in_dim": draw(st.integers(1, 4)),
            "out_dim": draw(st.integers(1, 3)), "rank": draw(st.integers(1, 3)), "bias": draw(st.booleans()),
            "rows": draw(st.integers(1, 4)), "score": draw(st.sampled_from(["softmax", "relu"])),
            "seed": draw(st.integers(0, 2**16))}


def _check_product_key_layer(case, backend):
    rng = np.random.default_rng(case["seed"])
    dtype = _dtype(backend)
    router = R.ProductKeyRouter(k=case["k"], heads=case["heads"], key_dim=case["key_dim"], k_half=case["k_half"],
                                score=case["score"])
    with tensormoe.backend_context("numpy"):
        layer = LAYER_CLASSES[case["kind"]](case["in_dim"], case["out_dim"], [case["n"], case["n"]], case["rank"],
                                            router=router, bias=case["bias"], dtype=dtype)
    # every parameter random; the router's in small dyadic steps, so float32 scores are exact (ties included)
    params = {}
    for name, shape in layer.param_shapes().items():
        routing_param = name.startswith(("query", "keys"))
        params[name] = rng.integers(-4, 5, size=shape) / 8.0 if routing_param else rng.normal(size=shape)
    x = rng.integers(-8, 9, size=(case["rows"], case["in_dim"])) / 4.0
    want_routing = ref.product_key_brute_force(x, params["query_0"], params["query_1"], params["keys_0"],
                                               params["keys_1"], case["k"], score=case["score"])
    with tensormoe.backend_context("numpy"):
        weight = layer.factorization.to_dense(params)  # float64, through TensorLy
    xin = np.concatenate([x, np.ones((len(x), 1))], axis=1) if case["bias"] else x
    want = ref.paired_output(weight, xin, want_routing["level0"], want_routing["level1"], want_routing["weights"])
    ops = get_ops()
    p = {name: ops.asarray(value, dtype) for name, value in params.items()}
    y, (first, second) = layer.apply(p, ops.asarray(x, dtype), return_routing=True, backend=backend)
    assert to_numpy(first.indices).tolist() == want_routing["level0"].tolist()
    assert to_numpy(second.indices).tolist() == want_routing["level1"].tolist()
    tol = (1e-4 if dtype == "float32" else 1e-9) * (1 + np.abs(want).max())
    np.testing.assert_allclose(to_numpy(y), want, rtol=0, atol=tol)
    np.testing.assert_allclose(to_numpy(layer.dense_forward(p, ops.asarray(x, dtype), backend=backend)), want,
                               rtol=0, atol=tol)


def test_product_key_layer_equals_the_loop_over_the_brute_force_pairs(backend):
    @settings(max_examples={"numpy": 12, "pytorch": 8, "jax": 2}[backend])
    @given(case=product_key_layers())
    def check(case):
        _check_product_key_layer(case, backend)

    check()


def test_product_key_layer_checks(backend):
    if backend == "jax":
        pytest.skip("backend-neutral checks; the layer tests above run the product-key layer on JAX")
    router = R.ProductKeyRouter(k=2, key_dim=2)
    with pytest.raises(ValueError, match=r"equal size \[n, n\]; got expert_dims=\[4, 3\]"):
        tensormoe.CPMMoE(4, 4, [4, 3], rank=2, router=router)
    layer = tensormoe.CPMMoE(4, 3, [4, 4], rank=2, router=router)
    ops = get_ops()
    x = ops.asarray(np.ones((5, 4)), "float32")
    with pytest.raises(ValueError, match=r"selects pairs of experts"):
        layer.coefficients(None, x)
    first, second = layer.route(None, x)
    bad = second._replace(indices=second.indices[:, :1], weights=second.weights[:, :1])
    with pytest.raises(ValueError, match=r"selected together \(product keys\)"):
        layer.apply(None, x, routing=[first, bad])
    np.testing.assert_allclose(to_numpy(layer.apply(None, x, routing=[first, second])), to_numpy(layer(x)), atol=1e-6)


def test_layer_capacity_and_policy_follow_the_mode(backend):
    # the gshard defaults: factor 1.25 in training, 2.0 in eval, random second expert drawn from rng
    rng = np.random.default_rng(2)
    tokens, n = 24, 4
    ops = get_ops()
    dtype = _dtype(backend)
    with tensormoe.backend_context("numpy"):
        layer = tensormoe.CPMMoE(n, 3, [n], rank=2, router="gshard", dtype=dtype)
    params = {k: ops.asarray(v, dtype) for k, v in layer.params.items()}
    params["gate_0"] = ops.asarray(np.eye(n), dtype)
    logits = rng.integers(-16, 17, size=(tokens, n)) / 8.0 + np.array([1.5, 0.5, 0.0, -0.5])  # expert 0 popular
    x = ops.asarray(logits, dtype)
    for training, factor in ((True, 1.25), (False, 2.0)):
        _, (r,) = layer.apply(params, x, training=training, rng=11, return_routing=True, backend=backend)
        uniform = np.random.default_rng(11).random((1, tokens))[0]
        want = ref.top_k(logits, 2, policy="random", threshold=0.2, uniform=uniform,
                         cap=ref.capacity(tokens, n, factor))
        assert to_numpy(r.kept).tolist() == want["kept"].tolist(), training
        assert float(r.dropped_tokens) == want["dropped_tokens"]
    with pytest.raises(ValueError, match=r"second_policy='random'.*needs rng="):
        layer.apply(params, x, backend=backend)


def test_pass_through_layer_outputs_the_input_of_tokens_no_expert_processes(backend):
    router = R.TopKRouter(k=2, noise=None, second_policy="threshold", second_threshold=0.3, capacity_factor=0.75,
                          min_capacity=1, overflow="pass-through")
    dtype = _dtype(backend)
    with tensormoe.backend_context("numpy"):
        layer = tensormoe.CPMMoE(3, 3, [3], rank=2, router=router, dtype=dtype)
        params = {k: np.random.default_rng(4).normal(size=v.shape) for k, v in layer.params.items()}
    params["gate_0"] = np.eye(3)
    weight = np.einsum("nr,ir,or->nio", params["factor_0"], params["factor_1"], params["factor_2"])
    xin = np.concatenate([LOGITS, np.ones((4, 1))], axis=1)
    want = ref.combine(ref.top_k(LOGITS, 2, policy="threshold", threshold=0.3, cap=1),
                       np.einsum("ti,nio->tno", xin, weight), LOGITS, "pass-through")
    ops = get_ops()
    p = {k: ops.asarray(v, dtype) for k, v in params.items()}
    y = to_numpy(layer.apply(p, ops.asarray(LOGITS, dtype), backend=backend))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y[2], to_numpy(ops.asarray(LOGITS, dtype))[2])  # token 2: its input, exactly
    np.testing.assert_allclose(to_numpy(layer.dense_forward(p, ops.asarray(LOGITS, dtype), backend=backend)), want,
                               rtol=1e-5, atol=1e-5)
    masked = to_numpy(layer.apply(p, ops.asarray(LOGITS, dtype), mask=ops.asarray(np.array([1, 1, 0, 1]) > 0),
                                  backend=backend))
    assert np.all(masked[2] == 0)  # padding is never passed through


def test_layer_with_capacity_under_jax_jit_and_grad():
    jax = pytest.importorskip("jax")
    with tensormoe.backend_context("jax"):
        layer = tensormoe.CPMMoE(4, 4, [4], rank=2, router="gshard")
        x = jax.numpy.asarray(np.random.default_rng(0).normal(size=(2, 12, 4)), "float32")

        def loss(params, key):
            y, routing = layer.apply(params, x, training=True, rng=key, return_routing=True)
            return (y ** 2).mean() + tensormoe.aux_loss(routing)

        value, grads = jax.jit(jax.value_and_grad(loss))(layer.params, jax.random.key(0))
        assert np.isfinite(float(value)) and all(np.isfinite(np.asarray(g)).all() for g in grads.values())


@pytest.mark.parametrize("shell_backend", ["pytorch", "jax"])
def test_shells_pass_the_mode_and_rng_to_capacity_and_product_keys(shell_backend):
    import importlib

    pytest.importorskip("torch" if shell_backend == "pytorch" else "jax")
    shells = importlib.import_module({"pytorch": "tensormoe.torch", "jax": "tensormoe.jax"}[shell_backend])
    rng = np.random.default_rng(3)
    with tensormoe.backend_context(shell_backend):
        ops = get_ops()
        x = ops.asarray(rng.normal(size=(2, 12, 4)), "float32")
        cases = [("gshard", [4], True), ("gshard", [4], False), (R.ProductKeyRouter(k=2, heads=2, key_dim=2), [3, 3], True)]
        # the shells' code is the same for every router: JAX (a compilation per case) checks one
        for router, dims, training in cases if shell_backend == "pytorch" else cases[:1]:
            core = tensormoe.CPMMoE(4, 4, dims, rank=2, router=router, seed=1)
            shell = shells.wrap(core)
            y, routing = shell(x, training=training, rng=5, return_routing=True)
            want, want_routing = core.apply(None, x, training=training, rng=5, return_routing=True)
            np.testing.assert_allclose(to_numpy(y), to_numpy(want), rtol=1e-5, atol=1e-5)
            for r, w in zip(routing, want_routing):
                assert to_numpy(r.indices).tolist() == to_numpy(w.indices).tolist()
                if w.kept is not None:
                    assert to_numpy(r.kept).tolist() == to_numpy(w.kept).tolist()
