"""``tensormoe.routing.batch_norm`` against the float64 model of the reference's BatchNorm gates (issue 14).

The expected values come from ``tests/reference_model.py`` (``BatchNorm1d(N, affine=False)`` written from
its definition), never from the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference_model as ref
from helpers import float64_on, to_numpy
from tensormoe.frameworks import get_ops
from tensormoe.routing import BatchNormState, batch_norm, batch_norm_state

TOL = dict(rtol=1e-12, atol=1e-12)


def _state(ops, mean, var, count):
    return BatchNormState(ops.asarray(mean, "float64"), ops.asarray(var, "float64"), ops.asarray(np.int64(count)))


def _check(backend, z, mean, var, count, training):
    ops = get_ops(backend)
    out, new = batch_norm(ops.asarray(z, "float64"), _state(ops, mean, var, count), training=training)
    want, want_mean, want_var, want_count = ref.batch_norm(z, mean, var, count, training=training)
    np.testing.assert_allclose(to_numpy(out), want, **TOL)
    np.testing.assert_allclose(to_numpy(new.mean), want_mean, **TOL)
    np.testing.assert_allclose(to_numpy(new.var), want_var, **TOL)
    assert int(to_numpy(new.count)) == int(want_count)
    return new


@given(
    shape=st.sampled_from([(2, 3), (5, 1), (3, 2, 4), (1, 3, 2), (4, 4, 1), (2, 1, 6)]),
    training=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_batch_norm_equals_the_reference(backend, shape, training, seed):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=shape) * rng.uniform(0.1, 3.0) + rng.normal(size=shape[-1:])
    mean, var, count = rng.normal(size=shape[-1]), rng.uniform(0.5, 2.0, size=shape[-1]), rng.integers(0, 100)
    with float64_on(backend):
        _check(backend, z, mean, var, count, training)


def test_train_train_eval_chain_threads_the_state(backend):
    rng = np.random.default_rng(0)
    with float64_on(backend):
        ops = get_ops(backend)
        state = batch_norm_state(4, "float64", ops)
        mean, var, count = np.zeros(4), np.ones(4), 0
        for training, shape in [(True, (6, 2, 4)), (True, (3, 4)), (False, (2, 5, 4))]:
            z = rng.normal(size=shape) + 2.0
            out, state = batch_norm(ops.asarray(z, "float64"), state, training=training)
            want, mean, var, count = ref.batch_norm(z, mean, var, count, training=training)
            np.testing.assert_allclose(to_numpy(out), want, **TOL)
        np.testing.assert_allclose(to_numpy(state.mean), mean, **TOL)
        np.testing.assert_allclose(to_numpy(state.var), var, **TOL)
        assert int(to_numpy(state.count)) == 2


def test_one_row_in_training_is_refused_as_the_reference_refuses_it(backend):
    ops = get_ops(backend)
    z = ops.asarray(np.ones((1, 1, 3)), "float32")
    with pytest.raises(ValueError, match=r"more than one row per expert.*shape \(1, 1, 3\) \(1 row\)"):
        batch_norm(z, batch_norm_state(3, "float32", ops), training=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ref.batch_norm(np.ones((1, 1, 3)), np.zeros(3), np.ones(3), 0, training=True)
    out, _ = batch_norm(z, batch_norm_state(3, "float32", ops), training=False)  # evaluation: fine
    assert to_numpy(out).shape == (1, 1, 3)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(state=(np.zeros(3), np.ones(3), 0)), TypeError, "state must be a BatchNormState"),
        (dict(state=BatchNormState(np.zeros(2), np.ones(3), np.array(0))), ValueError, r"state.mean must have shape \(3,\)"),
        (dict(momentum=1.5), ValueError, r"momentum must be in \[0, 1\]; got 1.5"),
        (dict(eps=-1.0), ValueError, "eps must be"),
        (dict(training="yes"), TypeError, "training must be True or False"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, error, message):
    args = dict(state=batch_norm_state(3, "float64", get_ops("numpy")), training=True, ops=get_ops("numpy"))
    with pytest.raises(error, match=message):
        batch_norm(np.ones((4, 3)), **{**args, **kwargs})


def _reference_jvp(z, v, c, mean, var):
    """d/de sum(c * BN(z + e v)) in training, by 4th-order central differences of the float64 reference."""
    def f(e):
        return float(np.sum(c * ref.batch_norm(z + e * v, mean, var, 0, training=True)[0]))

    h = 1e-3
    return (-f(2 * h) + 8 * f(h) - 8 * f(-h) + f(-2 * h)) / (12 * h)


def test_gradient_in_training_flows_through_the_batch_statistics_only():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    z, v, c = rng.normal(size=(5, 2, 3)), rng.normal(size=(5, 2, 3)), rng.normal(size=(5, 2, 3))
    mean, var = rng.normal(size=3), rng.uniform(0.5, 2.0, size=3)
    zt = torch.tensor(z, requires_grad=True)
    state = BatchNormState(torch.tensor(mean), torch.tensor(var), torch.tensor(0))
    out, new = batch_norm(zt, state, training=True, ops=get_ops("pytorch"))
    (grad,) = torch.autograd.grad((out * torch.tensor(c)).sum(), zt)
    assert not new.mean.requires_grad and not new.var.requires_grad
    np.testing.assert_allclose(float((grad.numpy() * v).sum()), _reference_jvp(z, v, c, mean, var), rtol=1e-8)


def test_jax_under_jit_and_grad_equals_the_reference():
    jax = pytest.importorskip("jax")
    rng = np.random.default_rng(4)
    z, v, c = rng.normal(size=(4, 3, 2)), rng.normal(size=(4, 3, 2)), rng.normal(size=(4, 3, 2))
    mean, var = rng.normal(size=2), rng.uniform(0.5, 2.0, size=2)
    with jax.enable_x64(True):
        ops = get_ops("jax")
        state = _state(ops, mean, var, 5)

        @jax.jit
        def loss(zz, s):
            out, new = batch_norm(zz, s, training=True, ops=ops)
            return (out * c).sum(), new

        (value, new), grad = jax.value_and_grad(loss, has_aux=True)(ops.asarray(z, "float64"), state)
        want, want_mean, want_var, want_count = ref.batch_norm(z, mean, var, 5, training=True)
        np.testing.assert_allclose(float(value), float((want * c).sum()), **TOL)
        np.testing.assert_allclose(np.asarray(new.mean), want_mean, **TOL)
        np.testing.assert_allclose(np.asarray(new.var), want_var, **TOL)
        assert int(new.count) == 6
        np.testing.assert_allclose(float((np.asarray(grad) * v).sum()), _reference_jvp(z, v, c, mean, var), rtol=1e-8)


def test_half_precision_logits_keep_their_dtype_and_the_state_its_own():
    torch = pytest.importorskip("torch")
    ops = get_ops("pytorch")
    z = torch.randn(8, 4, dtype=torch.float16)
    state = batch_norm_state(4, "float32", ops)
    out, new = batch_norm(z, state, training=True, ops=ops)
    assert out.dtype == torch.float16 and new.mean.dtype == torch.float32 and new.var.dtype == torch.float32
    want, want_mean, _, _ = ref.batch_norm(z.double().numpy(), np.zeros(4), np.ones(4), 0, training=True)
    np.testing.assert_allclose(out.double().numpy(), want, atol=4e-3)
    np.testing.assert_allclose(new.mean.double().numpy(), want_mean, atol=1e-6)
