"""tensormoe.analysis against hand computations on tiny layers, on every installed backend."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import BACKENDS, exact_forward, to_numpy

import tensormoe
from tensormoe.tools import analysis
from tensormoe.ops import get_ops

FORMATS = {
    "cp": lambda dims, **kw: tensormoe.CPMMoE(4, 3, dims, rank=3, **kw),
    "tucker": lambda dims, **kw: tensormoe.TuckerMMoE(4, 3, dims, ranks=2, **kw),
    "tt": lambda dims, **kw: tensormoe.TTMMoE(4, 3, dims, ranks=2, **kw),
    "tr": lambda dims, **kw: tensormoe.TRMMoE(4, 3, dims, ranks=2, **kw),
}


# every format on NumPy, one format on the other backends (the edits compute in NumPy whatever the backend;
# each new layer compiles its own functions on JAX, which would dominate the run time)
FORMAT_CASES = [pytest.param(b, k, id=f"{b}-{k}") for b in BACKENDS for k in sorted(FORMATS) if b == "numpy" or k == "tr"]
GATE_CASES = [pytest.param(b, g, id=f"{b}-{g}") for b in BACKENDS for g in ("entmax15", "softmax", "sparsemax")
              if b == "numpy" or g == "entmax15"]


def randomised(layer, seed=0):
    """The layer with every parameter drawn at random (gates included: init gates are zero, coefficients uniform)."""
    rng = np.random.default_rng(seed)
    layer.params = {k: rng.normal(size=v.shape).astype(layer.dtype) for k, v in layer.params.items()}
    return layer


def inputs(backend, shape, seed=1):
    return get_ops(backend).asarray(np.random.default_rng(seed).normal(size=shape), "float32")


# --- independent references ------------------------------------------------------------------


def ref_layer_norm(z):
    c = z - z.mean(-1, keepdims=True)
    return c / np.sqrt((c * c).mean(-1, keepdims=True) + 1e-5)


def ref_simplex(z, alpha):
    """softmax (alpha=1), 1.5-entmax, sparsemax (alpha=2), thresholds by bisection in float64."""
    if alpha == 1:
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    power = 1 / (alpha - 1)
    zs = (alpha - 1) * z
    lo, hi = zs.max(-1, keepdims=True) - 1, zs.max(-1, keepdims=True)
    for _ in range(200):
        mid = (lo + hi) / 2
        total = (np.clip(zs - mid, 0, None) ** power).sum(-1, keepdims=True)
        lo, hi = np.where(total > 1, mid, lo), np.where(total > 1, hi, mid)
    p = np.clip(zs - (lo + hi) / 2, 0, None) ** power
    return p / p.sum(-1, keepdims=True)


ALPHA = {"softmax": 1, "entmax15": 1.5, "sparsemax": 2}


def entropy(p):
    p = p / p.sum()
    return -sum(v * math.log(v) for v in p if v > 0)


# --- statistics -----------------------------------------------------------------------------------


def test_usage_statistics_by_hand(backend):
    layer = randomised(tensormoe.CPMMoE(4, 3, [5, 3], rank=2, gate="sparsemax"))
    x = inputs(backend, (6, 7, 4))
    labels = np.random.default_rng(2).integers(0, 4, size=(6, 7))
    labels[0, :3] = -1  # padding rows
    coeffs = layer.coefficients(None, x)
    usage = analysis.expert_usage(coeffs, get_ops(backend).asarray(labels), threshold=0.01)
    a = [to_numpy(c).reshape(-1, c.shape[-1]) for c in coeffs]
    y = labels.reshape(-1)
    keep = y >= 0
    a, y = [v[keep] for v in a], y[keep]
    joint = np.stack([np.outer(a[0][b], a[1][b]).ravel() for b in range(len(y))])
    assert usage.rows == len(y) and usage.n_classes == 4
    for level, v in [(0, a[0]), (1, a[1]), (None, joint)]:
        n = v.shape[1]
        np.testing.assert_allclose(usage.mean_coefficient(level), v.mean(0), rtol=1e-6)
        np.testing.assert_allclose(usage.active_fraction(level), (v > 0.01).mean(0))
        rows_h = [entropy(r) for r in v if r.sum() > 0]
        assert usage.mean_entropy(level) == pytest.approx(np.mean(rows_h), rel=1e-6)
        means = np.array([[v[y == c, e].mean() for e in range(n)] for c in range(4)])
        np.testing.assert_allclose(usage.class_mean(level), means, rtol=1e-6)
        for e in range(n):
            if v[:, e].sum() == 0:
                assert np.isnan(usage.top_share(level)[e]) and usage.top_class(level)[e] == -1
                continue
            balanced = means[:, e] / means[:, e].sum()
            raw = np.array([v[y == c, e].sum() for c in range(4)]) / v[:, e].sum()
            assert usage.top_share(level)[e] == pytest.approx(balanced.max(), rel=1e-6)
            assert usage.top_share(level, balanced=False)[e] == pytest.approx(raw.max(), rel=1e-6)
            assert usage.top_class(level)[e] == balanced.argmax()
            assert usage.class_entropy(level)[e] == pytest.approx(entropy(balanced) / math.log(4), rel=1e-6, abs=1e-12)
            others = np.delete(means[:, e], 0).mean()
            assert usage.selectivity(level)[e, 0] == pytest.approx(means[0, e] - others, rel=1e-6, abs=1e-12)
        top = usage.top_experts(2, 3, level, by="mean")
        assert list(top) == list(np.argsort(-means[2], kind="stable")[:3])
    assert usage.expert_index(7) == (2, 1)


def test_usage_adds_over_batches():
    rng = np.random.default_rng(0)
    a = [rng.dirichlet(np.ones(4), size=20), rng.dirichlet(np.ones(2), size=20)]
    y = np.r_[rng.integers(0, 2, 10), rng.integers(0, 5, 10)]  # the first half sees two classes only
    whole = analysis.expert_usage(a, y)
    parts = sum(analysis.expert_usage([v[s] for v in a], y[s]) for s in (slice(0, 10), slice(10, 20)))
    assert parts.n_classes == whole.n_classes == 5 and parts.rows == 20
    for level in (0, 1, None):
        np.testing.assert_allclose(parts.class_mean(level), whole.class_mean(level))
        np.testing.assert_allclose(parts.mean_entropy(level), whole.mean_entropy(level))
        np.testing.assert_allclose(parts.active_fraction(level), whole.active_fraction(level))


def test_polysemanticity_and_class_accuracy_by_hand():
    drops = np.array([[0.3, -0.2, 0.0, 0.1], [0.0, 0.0, 0.0, 0.0], [0.1, 0.1, 0.1, 0.1], [np.nan, 0.2, 0.0, 0.0]])
    np.testing.assert_allclose(analysis.polysemanticity(drops), [1 - 0.3 / 0.4, np.nan, 0.75, 0.0])
    scores = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [1.0, 0.0, 0.0], [0.0, 5.0, 1.0], [0.0, 0.0, 1.0]])
    labels = np.array([0, 1, 0, 1, -1])
    np.testing.assert_allclose(analysis.class_accuracy(scores, labels), [1.0, 0.5, np.nan])


def test_ablation_effects_and_curve():
    effect = {0: np.array([0.5, 0.0, 0.0]), 1: np.array([0.1, 0.1, 0.1]), 2: np.zeros(3)}

    def evaluate(removed):
        return np.array([0.9, 0.8, 0.7]) - sum((effect[e] for e in removed), np.zeros(3))

    result = analysis.ablation_effects(evaluate, [0, 1, (0, 1)])
    np.testing.assert_allclose(result.drop, [[0.5, 0, 0], [0.1, 0.1, 0.1], [0.6, 0.1, 0.1]])
    np.testing.assert_allclose(result.polysemanticity(), [0.0, 2 / 3, 1 - 0.6 / 0.8])
    curve = analysis.ablation_curve(evaluate, [0, 1, 2], target=0, weights=[1, 1, 3])
    np.testing.assert_allclose(curve.target_accuracy, [0.9, 0.4, 0.3, 0.3])
    np.testing.assert_allclose(curve.other_accuracy, [(0.8 + 3 * 0.7) / 4, (0.8 + 2.1) / 4, (0.7 + 3 * 0.6) / 4,
                                                      (0.7 + 1.8) / 4])


# --- interventions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name,kind", FORMAT_CASES)
def test_after_mode_and_permanent_scale_by_hand(backend_name, kind):
    with tensormoe.backend_context(backend_name):
        _test_after_mode_and_permanent_scale_by_hand(backend_name, kind)


def _test_after_mode_and_permanent_scale_by_hand(backend, kind):
    layer = randomised(FORMATS[kind]([5]))
    x = inputs(backend, (8, 4))
    (a,) = layer.coefficients(None, x)
    (scaled,) = analysis.intervened_coefficients(layer, None, x, [1, 3], mode="after", scale=2.5)
    a_np, s_np = to_numpy(a), to_numpy(scaled)
    expected = a_np.copy()
    expected[:, [1, 3]] *= 2.5
    np.testing.assert_allclose(s_np, expected, rtol=1e-6)
    assert np.array_equal(s_np[:, [0, 2, 4]], a_np[:, [0, 2, 4]])  # the others untouched
    # the forward with those coefficients is the hand contraction through the dense tensor
    y = layer.apply(None, x, [scaled])
    params = {k: to_numpy(v) for k, v in layer.params.items()}
    np.testing.assert_allclose(to_numpy(y), exact_forward(layer, params, x, [expected]), rtol=1e-4, atol=1e-5)
    # the permanent edit of expert 1 and 3 (its factor slice) gives the same outputs
    own = tensormoe.convert_params(layer.params, backend)
    new = analysis.scale_expert(layer, own, 1, 2.5)
    new = analysis.scale_expert(layer, new, 3, 2.5)
    assert all(type(v) is type(own[k]) for k, v in new.items())
    np.testing.assert_allclose(to_numpy(layer.apply(new, x)), to_numpy(y), rtol=1e-4, atol=1e-5)
    w_old, w_new = (to_numpy(layer.dense_weight(p)) for p in (own, new))
    np.testing.assert_allclose(w_new[[1, 3]], 2.5 * w_old[[1, 3]], rtol=1e-5)
    assert np.array_equal(w_new[[0, 2, 4]], w_old[[0, 2, 4]])  # bit for bit


@pytest.mark.parametrize("backend_name,gate", GATE_CASES)
def test_before_mode_redistributes_by_hand(backend_name, gate):
    with tensormoe.backend_context(backend_name):
        _before_mode_redistributes_by_hand(backend_name, gate)


def _before_mode_redistributes_by_hand(backend, gate):
    layer = randomised(tensormoe.CPMMoE(4, 3, [6], rank=2, gate=gate))
    x = inputs(backend, (9, 4))
    (a,) = analysis.intervened_coefficients(layer, None, x, [0, 4], mode="before")
    logits = ref_layer_norm(to_numpy(x) @ layer.params["gate_0"].astype(np.float64))
    logits[:, [0, 4]] = -np.inf
    expected = ref_simplex(logits, ALPHA[gate])
    np.testing.assert_allclose(to_numpy(a), expected, atol=2e-6)
    assert np.all(to_numpy(a)[:, [0, 4]] == 0)
    np.testing.assert_allclose(to_numpy(a).sum(-1), 1, atol=1e-5)
    # nothing removed: the gate's own coefficients
    (same,) = analysis.intervened_coefficients(layer, None, x, [], mode="before")
    np.testing.assert_allclose(to_numpy(same), to_numpy(layer.coefficients(None, x)[0]), atol=1e-6)


def test_before_mode_top2_reselects_by_hand(backend):
    layer = randomised(tensormoe.CPMMoE(4, 3, [6, 2], rank=2, router=["top2", "softmax"]))
    x = inputs(backend, (9, 4))
    top, dense = analysis.intervened_coefficients(layer, None, x, [2], mode="before")
    z = to_numpy(x) @ layer.params["gate_0"].astype(np.float64)
    z[:, 2] = -np.inf
    probs = ref_simplex(z, 1)
    expected = np.zeros_like(probs)
    for b, row in enumerate(z):
        pick = np.argsort(-row, kind="stable")[:2]
        expected[b, pick] = probs[b, pick] / probs[b, pick].sum()
    np.testing.assert_allclose(to_numpy(top), expected, atol=1e-6)
    np.testing.assert_allclose(to_numpy(dense), to_numpy(layer.coefficients(None, x)[1]), atol=1e-6)


@pytest.mark.skipif("pytorch" not in BACKENDS, reason="PyTorch is not installed")
def test_intervene_patches_and_restores_torch_modules():
    import torch
    from torch.nn.functional import gelu

    from tensormoe.torch import CPMMoE, MMoEMLP, TRMMoE

    torch.manual_seed(0)
    mlp = MMoEMLP(CPMMoE(4, 6, [5], rank=3), TRMMoE(6, 4, [5], ranks=2))
    plain = CPMMoE(4, 3, [5], rank=3)
    with torch.no_grad():
        for p in [*mlp.parameters(), *plain.parameters()]:
            p.normal_()
    x = torch.randn(3, 7, 4)
    before = mlp(x), plain(x)
    with analysis.intervene([mlp, plain], (e for e in (0, 2)), scale=0.5):  # a generator works too
        inside = mlp(x), plain(x)
        with pytest.raises(RuntimeError, match="already active"), analysis.intervene(mlp, [1]):
            pass
    a = mlp.coefficients(x)[0].clone()
    a[..., [0, 2]] *= 0.5
    torch.testing.assert_close(inside[0], mlp.second(gelu(mlp.first(x, [a])), [a]))
    b = plain.coefficients(x)[0].clone()
    b[..., [0, 2]] *= 0.5
    torch.testing.assert_close(inside[1], plain(x, [b]))
    # restored on exit, also after an error inside the block
    with pytest.raises(KeyError, match="inside"), analysis.intervene(mlp, [1], mode="before"):
        raise KeyError("inside")
    torch.testing.assert_close(mlp(x), before[0], rtol=0, atol=0)
    torch.testing.assert_close(plain(x), before[1], rtol=0, atol=0)
    assert "coefficients" not in vars(mlp.first) and "forward" not in vars(plain)
    # the permanent edit of both layers of the block equals the inference-time removal
    edited = {name: analysis.scale_expert(m, None, 1, 0.0) for name, m in (("first", mlp.first),
                                                                         ("second", mlp.second))}
    with analysis.intervene(mlp, [1]):
        removed = mlp(x)
    for name, new in edited.items():
        getattr(mlp, name).load_state_dict({"params." + k: v for k, v in new.items()})
    torch.testing.assert_close(mlp(x), removed, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("jax" not in BACKENDS, reason="JAX is not installed")
def test_jax_pytree_layers_are_accepted():
    import jax.numpy as jnp

    from tensormoe.jax import wrap

    shell = wrap(randomised(tensormoe.CPMMoE(4, 3, [5], rank=3)))
    x = jnp.asarray(np.random.default_rng(6).normal(size=(7, 4)), dtype="float32")
    (a,) = analysis.intervened_coefficients(shell, None, x, [1])
    expected = to_numpy(shell.coefficients(x)[0])
    expected[:, 1] = 0
    np.testing.assert_allclose(to_numpy(a), expected, atol=1e-7)
    removed = shell.replace(analysis.scale_expert(shell, None, 1, 0.0))
    np.testing.assert_allclose(to_numpy(removed(x)), to_numpy(shell(x, [a])), rtol=1e-5, atol=1e-6)


# --- permanent edits ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name,kind", FORMAT_CASES)
def test_edit_expert_one_level_by_hand(backend_name, kind):
    with tensormoe.backend_context(backend_name):
        _test_edit_expert_one_level_by_hand(backend_name, kind)


def _test_edit_expert_one_level_by_hand(backend, kind):
    layer = randomised(FORMATS[kind]([5]))
    target = np.random.default_rng(3).normal(size=(5, 3))
    own = tensormoe.convert_params(layer.params, backend)
    new, report = analysis.edit_expert(layer, own, 2, get_ops(backend).asarray(target, "float32"))
    w_old = to_numpy(layer.dense_weight(own))
    w_new = to_numpy(layer.dense_weight(new))
    assert np.array_equal(np.delete(w_new, 2, 0), np.delete(w_old, 2, 0))  # every other expert, bit for bit
    assert report.shared == 0 and report.leakage == 0.0
    # the best the expert's slice can do, by hand: least squares over the matrices its slice entries select
    p = {k: v.astype(np.float64) for k, v in layer.params.items()}
    if kind == "cp":
        basis = np.einsum("ir,or->rio", p["factor_1"], p["factor_2"]).reshape(3, -1)
    elif kind == "tucker":
        basis = np.einsum("pqs,iq,os->pio", p["core"], p["factor_1"], p["factor_2"]).reshape(2, -1)
    else:  # chains: entry (a, b) of the slice G_1[a, n, b] selects sum_c G_2[b, i, c] G_3[c, o, a]
        basis = np.einsum("bic,coa->abio", p["factor_1"], p["factor_2"]).reshape(-1, 15)
    coef, *_ = np.linalg.lstsq(basis.T, target.reshape(-1), rcond=None)
    best = np.linalg.norm(basis.T @ coef - target.reshape(-1))
    assert report.residual == pytest.approx(best, rel=1e-4, abs=1e-5)
    assert report.requested == pytest.approx(np.linalg.norm(target - w_old[2]), rel=1e-5)
    assert report.achieved == pytest.approx(1 - best / report.requested, abs=1e-5)
    assert np.linalg.norm(w_new[2] - target) == pytest.approx(best, rel=1e-4, abs=1e-5)


def test_edit_expert_hierarchy_measures_leakage(backend):
    layer = randomised(tensormoe.CPMMoE(4, 3, [4, 3], rank=20))
    target = np.random.default_rng(4).normal(size=(5, 3))
    own = tensormoe.convert_params(layer.params, backend)
    new, report = analysis.edit_expert(layer, own, (1, 2), get_ops(backend).asarray(target, "float32"), level=0)
    w_old, w_new = (to_numpy(layer.dense_weight(p)) for p in (own, new))
    # rank 20 >= the 15 entries of a matrix: the edit itself is exact
    assert report.achieved == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(w_new[1, 2], target, atol=1e-4)
    # the experts (1, 0) and (1, 1) share the slice: their change, by hand
    rel = [np.linalg.norm(w_new[1, m] - w_old[1, m]) / np.linalg.norm(w_old[1, m]) for m in (0, 1)]
    assert report.shared == 2
    assert report.leakage == pytest.approx(max(rel), rel=1e-4) and report.mean_leakage == pytest.approx(np.mean(rel),
                                                                                                         rel=1e-4)
    assert report.leakage > 0.01  # a real leak, not rounding
    assert np.array_equal(np.delete(w_new, 1, 0), np.delete(w_old, 1, 0))  # experts (n != 1, *) untouched


# --- errors -----------------------------------------------------------------------------------------


def test_clear_errors():
    layer = tensormoe.CPMMoE(4, 3, [5], rank=2)
    x = np.ones((2, 4), dtype="float32")
    with pytest.raises(ValueError, match=r"mode='sideways' is not an intervention mode; expected one of"):
        analysis.intervened_coefficients(layer, None, x, [0], mode="sideways")
    with pytest.raises(ValueError, match=r"mode='before' removes experts .* got scale=2.0"):
        analysis.intervened_coefficients(layer, None, x, [0], mode="before", scale=2.0)
    with pytest.raises(ValueError, match=r"experts\[1\]=7 is not an expert of the level; expected an integer in \[0, 5\)"):
        analysis.intervened_coefficients(layer, None, x, [0, 7])
    with pytest.raises(ValueError, match=r"level must be an integer in \[0, 1\)"):
        analysis.scale_expert(layer, None, 0, 0.0, level=1)
    with pytest.raises(ValueError, match="cannot remove every expert"):
        analysis.intervened_coefficients(layer, None, x, range(5), mode="before")
    with pytest.raises(ValueError, match=r"labels must have the coefficients' leading shape \[2\]; got \[3\]"):
        analysis.expert_usage(np.ones((2, 5)) / 5, np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="class statistics need labels"):
        analysis.expert_usage(np.ones((2, 5)) / 5).class_mean()
    with pytest.raises(ValueError, match=r"target must be the expert's matrix of shape \[5, 3\]"):
        analysis.edit_expert(layer, None, 0, np.ones((4, 3)))
    with pytest.raises(TypeError, match="layer must be a tensormoe MMoE layer"):
        analysis.scale_expert("cp", None, 0, 0.0)


@pytest.mark.parametrize("backend_name,kind", FORMAT_CASES)
def test_add_rank_one_is_exact_and_owned_by_the_expert(backend_name, kind):
    with tensormoe.backend_context(backend_name):
        _test_add_rank_one_is_exact_and_owned_by_the_expert(backend_name, kind)


def _test_add_rank_one_is_exact_and_owned_by_the_expert(backend, kind):
    dtype = "float32" if backend == "jax" else "float64"  # JAX runs without 64-bit mode here
    tol = 1e-5 if dtype == "float32" else 1e-11
    layer = randomised(FORMATS[kind]([3, 3], dtype=dtype))
    rng = np.random.default_rng(5)
    u, v = rng.normal(size=5), rng.normal(size=3)
    own = tensormoe.convert_params(layer.params, backend)
    bigger, new = analysis.add_rank_one(layer, own, (2, 0), u, v)
    assert type(bigger) is type(layer) and all(type(x) is type(own["factor_0"]) for x in new.values())
    assert bigger.factorization.n_params() > layer.factorization.n_params()
    w_old, w_new = to_numpy(layer.dense_weight(own)), to_numpy(bigger.dense_weight(new))
    expected = w_old.copy()
    expected[2, 0] += np.outer(u, v)
    np.testing.assert_allclose(w_new, expected, rtol=tol, atol=tol)  # the expert gains u v^T, nobody else moves
    # the forward, by hand: the old output plus each row's product of the expert's coefficients times (x, 1) @ u, v
    x = get_ops(backend).asarray(rng.normal(size=(6, 4)), dtype)
    a = layer.coefficients(own, x)
    extra = to_numpy(a[0])[:, 2] * to_numpy(a[1])[:, 0] * (np.c_[to_numpy(x), np.ones(6)] @ u)
    np.testing.assert_allclose(to_numpy(bigger.apply(new, x, a)),
                               to_numpy(layer.apply(own, x, a)) + extra[:, None] * v, rtol=10 * tol, atol=10 * tol)


def test_add_rank_one_needs_room_in_tucker():
    layer = tensormoe.TuckerMMoE(4, 3, [2], ranks=[2, 3, 3])
    with pytest.raises(ValueError, match=r"ranks \[2, 3, 3\] already reach the mode sizes \[2, 5, 3\] at modes \[0, 2\]"):
        analysis.add_rank_one(layer, None, 0, np.ones(5), np.ones(3))
