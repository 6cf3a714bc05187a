"""Lowered contraction programs equal the einsum they implement, on every backend.

Every candidate program of a plan (every contraction order and operand role the
search keeps) computes the same contraction as ``np.einsum`` in float64; the
programs are plain array code, so autograd and ``jax.jit`` go through them.
"""

from __future__ import annotations

import itertools

import numpy as np
import opt_einsum
import pytest
from helpers import BACKENDS, to_numpy
from hypothesis import given
from hypothesis import strategies as st

import tensormoe
from tensormoe.frameworks import get_ops
from tensormoe.network import contraction, lowering
from tensormoe.network.contraction import execute

FORMATS = {
    "cp": lambda dims, r: tensormoe.factorizations.CP(dims, rank=r, n_expert_modes=len(dims) - 2),
    "tucker": lambda dims, r: tensormoe.factorizations.Tucker(dims, ranks=r, n_expert_modes=len(dims) - 2),
    "tt": lambda dims, r: tensormoe.factorizations.TT(dims, ranks=r, n_expert_modes=len(dims) - 2),
    "tr": lambda dims, r: tensormoe.factorizations.TR(dims, ranks=r, n_expert_modes=len(dims) - 2),
}


def _forward_operands(fmt, dims, rank, batch, seed):
    f = FORMATS[fmt](dims, rank)
    rng = np.random.default_rng(seed)
    shapes = [(batch, n) for n in dims[:-2]] + [(batch, dims[-2])] + list(f.param_shapes().values())
    return f.forward_equation(), [rng.standard_normal(s) for s in shapes]


def _reference(equation, operands):
    """The contraction by opt_einsum's own optimal path, in float64 (independent of tensormoe's lowering)."""
    return opt_einsum.contract(equation, *operands, optimize="optimal")


networks = st.tuples(
    st.sampled_from(sorted(FORMATS)),
    st.lists(st.integers(1, 4), min_size=1, max_size=2),  # experts per level
    st.integers(1, 5),  # in
    st.integers(1, 5),  # out
    st.integers(1, 3),  # rank
    st.integers(1, 4),  # batch
    st.integers(0, 2**16),
)


@given(networks, st.integers(1, 9))
def test_every_order_and_role_equals_einsum(network, other_batch):
    """Each contraction order of a forward network, with random operand roles, lowers to the einsum; lowered
    with the batch index free (for any number of rows), the same program equals the einsum at another batch."""
    fmt, experts, i, o, rank, batch, seed = network
    equation, operands = _forward_operands(fmt, [*experts, i, o], rank, batch, seed)
    expected = _reference(equation, operands)
    shapes = [x.shape for x in operands]
    terms, output, sizes = lowering._parse(equation, shapes)
    orders = [order for order, _ in itertools.islice(lowering._all_orders(terms, output, sizes), 0, 6 * 37, 37)]
    _, others = _forward_operands(fmt, [*experts, i, o], rank, other_batch, seed + 1)
    other_expected = _reference(equation, others)
    rows = equation[0]  # the forward equation's first index is the batch
    rng = np.random.default_rng(seed)
    for order in orders:
        flips = rng.integers(0, 2, size=len(order)).astype(bool)
        path = lowering._swapped(order, flips)
        program = lowering.lower(equation, shapes, path)
        np.testing.assert_allclose(program(*operands, backend="numpy"), expected, rtol=1e-10, atol=1e-10)
        if batch >= 2:  # lowered at one batch size, run at another
            free = lowering.lower(equation, shapes, path, free=rows)
            np.testing.assert_allclose(free(*others, backend="numpy"), other_expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_candidates_of_a_large_plan_agree_on_every_backend(fmt, backend):
    """A plan above SEARCH_FLOPS keeps several programs; each equals np.einsum on each backend."""
    dims = [24, 6, 96, 80] if fmt == "cp" else [24, 96, 80]
    rank = {"cp": 32, "tucker": [8, 16, 16], "tt": [1, 16, 16, 1], "tr": [8, 16, 16]}[fmt]
    equation, operands = _forward_operands(fmt, dims, rank, 128, 0)
    shapes = [x.shape for x in operands]
    plan = contraction.get_plan(equation, *shapes, backend=backend, dtype="float32")
    assert plan.flops >= contraction.SEARCH_FLOPS
    assert len(plan.candidates) > 1
    expected = _reference(equation, operands)
    ops = get_ops(backend)
    arrays = [ops.asarray(x.astype("float32")) for x in operands]
    for program in plan.candidates:
        out = to_numpy(program(*arrays, backend=ops.einsum_backend))
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # the first call times the candidates and keeps one of them
    out = to_numpy(execute(ops, equation, arrays))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert plan.tuned and plan.program in plan.candidates


def test_jax_plans_are_timed_while_a_forward_is_traced():
    """Under jax.jit the operands are tracers: the candidates are timed on stand-ins, outside the trace."""
    pytest.importorskip("jax")
    if "jax" not in BACKENDS:
        pytest.skip("jax backend unavailable")
    import jax

    equation, operands = _forward_operands("tucker", [24, 96, 80], [8, 16, 16], 128, 3)
    contraction.clear_cache()
    ops = get_ops("jax")
    arrays = [ops.asarray(x.astype("float32")) for x in operands]
    out = jax.jit(lambda *a: execute(ops, equation, list(a)))(*arrays)
    plan = contraction.get_plan(equation, *(x.shape for x in operands), backend="jax", dtype="float32")
    assert plan.tuned and plan.program in plan.candidates
    expected = _reference(equation, operands)
    np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_cp_forward_copies_nothing():
    """The CP forward is x @ U_i, a @ U_n, a product and a matmul with U_o.T: all views."""
    for experts in ([64], [16, 16]):
        equation, operands = _forward_operands("cp", [*experts, 96, 80], 32, 64, 0)
        plan = contraction.get_plan(equation, *(x.shape for x in operands))
        assert all(p.copied == 0 for p in plan.candidates)


def test_size_one_axes_are_not_copied():
    """The TT boundary rank of size one does not force a transpose of the first core."""
    program = lowering.lower("ab,ebf->aef", [(4, 6), (1, 6, 3)], [(0, 1)])
    assert program.copied == 0


def test_torch_autograd_through_a_program():
    torch = pytest.importorskip("torch")
    equation, operands = _forward_operands("tr", [5, 4, 3], [2, 3, 2], 3, 1)
    program = lowering.candidates(equation, [x.shape for x in operands], [], limit=1)[0]
    leaves = [torch.tensor(x, requires_grad=True) for x in operands]
    program(*leaves, backend="torch").sum().backward()
    reference = [torch.tensor(x, requires_grad=True) for x in operands]
    torch.einsum(equation, *reference).sum().backward()
    for a, b in zip(leaves, reference):
        np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_jax_jit_through_a_program():
    pytest.importorskip("jax")
    if "jax" not in BACKENDS:
        pytest.skip("jax backend unavailable")
    import jax
    import jax.numpy as jnp

    equation, operands = _forward_operands("tucker", [5, 4, 3], [2, 3, 2], 3, 2)
    program = lowering.candidates(equation, [x.shape for x in operands], [], limit=1)[0]
    arrays = [jnp.asarray(x, dtype=jnp.float32) for x in operands]
    out = jax.jit(lambda *a: program(*a, backend="jax"))(*arrays)
    np.testing.assert_allclose(np.asarray(out), _reference(equation, operands), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "path, match",
    [([(0, 1, 2)], "contracts 3 operands"), ([(0, 1)], "leaves 2 operands")],
)
def test_bad_paths_are_refused(path, match):
    with pytest.raises(ValueError, match=match):
        lowering.lower("ab,bc,cd->ad", [(2, 3), (3, 4), (4, 5)], path)


def test_leading_bond_becomes_a_broadcast_axis():
    """x[b, i] against a ring core G[p, i, q]: p becomes a batch axis; the core is read in place."""
    program = lowering.lower("bi,piq->bpq", [(2, 50), (4, 50, 3)], [(0, 1)])
    step = program.steps[0]
    assert step.b_perm is None  # the core is not transposed
    assert program.copied == 4 * 2 * 50  # only x is repeated along p (PyTorch materialises it)
    x, g = np.random.default_rng(0).normal(size=(2, 50)), np.random.default_rng(1).normal(size=(4, 50, 3))
    np.testing.assert_allclose(program(x, g, backend="numpy"), np.einsum("bi,piq->bpq", x, g), rtol=1e-12)
