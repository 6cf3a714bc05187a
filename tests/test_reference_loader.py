"""Reference checkpoints (issue 14): ``tensormoe.tools.reference.read_state_dict`` maps every tensor, refuses the rest.

The checkpoints come from ``tests/reference_model.py`` (every reference version, its exact names and
shapes, every tensor random); the expected outputs from its float64 forward.  The mapping is checked by
computing the layers it describes with tensormoe's public pieces (the layer with given coefficients,
``batch_norm``, the gate activations) and comparing with the reference model in training and in evaluation.
"""

from __future__ import annotations

import os
import re
import zlib

import numpy as np
import pytest
import tensormoe
from helpers import BACKENDS, float64_on, to_numpy
from reference_model import reference_directional_derivative, reference_forward, reference_state_dict
from test_reference_model import CASES

from tensormoe.frameworks import get_ops
from tensormoe.tools.reference import SOURCES, from_reference, read_state_dict

TOL = dict(rtol=1e-12, atol=1e-12)
# over-complete Tucker ranks (the reference's own test and README use them) warn: expected here
pytestmark = pytest.mark.filterwarnings("ignore::tensormoe.network.factorizations.RankWarning")


def _place(place):
    """A ``ReferenceCheckpoint.names`` place as a ``ReferenceModel.params`` name."""
    return place.replace("layers[0].", "first.").replace("layers[1].", "second.")


@pytest.mark.parametrize("version, kwargs, act, tokens", CASES)
def test_every_version_maps_every_tensor_by_name(version, kwargs, act, tokens):
    state = reference_state_dict(version, **kwargs, rng=np.random.default_rng(zlib.crc32(version.encode())))
    checkpoint = read_state_dict(state, gate=act)
    assert checkpoint.source == version
    assert set(checkpoint.names) == set(state)  # nothing dropped
    # every tensor is at the place its name says, the same object (nothing copied)
    for name, place in checkpoint.names.items():
        if place.startswith("layers["):
            layer, param = re.fullmatch(r"layers\[(\d)\]\.(\w+)", place).groups()
            assert checkpoint.params[int(layer)][param] is state[name]
        elif place.startswith("gate_norm_state"):
            level, field = re.fullmatch(r"gate_norm_state\[(\d)\]\.(\w+)", place).groups()
            assert getattr(checkpoint.gate_norm_state[int(level)], field) is state[name]
        else:
            assert checkpoint.input_ln[("input_ln.weight", "input_ln.bias").index(place)] is state[name]


#: the cases run on JAX too (each compiles its own plans there): every version and feature at least once
JAX_CASES = {
    "MMoE.CPMMoE-expert_dims=[32,2]-rank=32-hierarchy=2",
    "MMoE.TuckerMMoE-expert_dims=[32]-ranks=[8,8,8]",
    "MMoE.TTMMoE-expert_dims=[32,2]-ranks=[[4,32,4],[4,32,4],[4,4,4],[4,8,4]]-hierarchy=2",
    "MuMoE.CPMuMoE-expert_dims=[5]-ranks=5-hierarchy=1-second_dim=4-apply_ln=True",
    "MuMoE.TRMuMoE-expert_dims=[5,3]-ranks=[[3,None,2],[2,None,4],[4,None,3],[3,None,3]]-hierarchy=2-second_dim=3-normalization=ln-use_bias=False",
}
BACKEND_CASES = [
    pytest.param(b, *case.values, id=f"{b}-{case.id}")
    for b in BACKENDS for case in CASES if b != "jax" or case.id in JAX_CASES
]


def test_the_jax_cases_exist():
    assert JAX_CASES <= {case.id for case in CASES}


@pytest.mark.parametrize("backend, version, kwargs, act, tokens", BACKEND_CASES)
def test_loaded_checkpoint_computes_the_reference_in_training_and_evaluation(backend, version, kwargs, act, tokens):
    rng = np.random.default_rng(zlib.crc32(f"{version}{kwargs}".encode()))
    state = reference_state_dict(version, **kwargs, rng=rng)
    inputs = [rng.normal(size=(5, kwargs["input_dim"])), rng.normal(size=(2, tokens, kwargs["input_dim"]))]
    if backend == "jax":
        inputs = inputs[1:]  # each shape compiles the plans anew
    with tensormoe.backend_context(backend), float64_on(backend):
        model = from_reference(state, gate=act, dtype="float64")
        ops = get_ops(backend)
        stats = model.state
        want_stats = {k: v for k, v in state.items() if k.startswith("bn.")}
        for x in inputs:  # train on 2-D, then 3-D input; evaluate both: the statistics carry over
            for training in (True, False):
                got, stats = model.apply(model.params, ops.asarray(x, "float64"), state=stats, training=training)
                want, want_stats = reference_forward(version, state, x, training=training, act=act,
                                                     running_stats=want_stats)
                got = to_numpy(got)
                assert got.shape == (*x.shape[:-1], want.shape[-1])  # tensormoe's [..., O]
                np.testing.assert_allclose(got.reshape(want.shape), want, **TOL)
                _record(version, "output", np.max(np.abs(got.reshape(want.shape) - want)), backend)
                for h, s in enumerate(stats or ()):
                    np.testing.assert_allclose(to_numpy(s.mean), want_stats[f"bn.{h}.running_mean"], **TOL)
                    np.testing.assert_allclose(to_numpy(s.var), want_stats[f"bn.{h}.running_var"], **TOL)
                    assert int(to_numpy(s.count)) == int(want_stats[f"bn.{h}.num_batches_tracked"])


#: measured max |difference| per (version, what, backend), printed by the last test of the module
MEASURED = {}


def _record(version, what, value, backend):
    key = (version, what, backend)
    MEASURED[key] = max(MEASURED.get(key, 0.0), float(value))


def test_sources_are_the_reference_versions():
    import reference_model

    assert SOURCES == reference_model.VERSIONS


def _cp_state():
    return reference_state_dict("MMoE.CPMMoE", 4, 6, [5, 3], rank=2, hierarchy=2, rng=np.random.default_rng(0))


def _tr_state(**kwargs):
    ranks = [[3, None, 2], [2, None, 4], [4, None, 3]]
    return reference_state_dict("MuMoE.TRMuMoE", 4, 6, [5], ranks, rng=np.random.default_rng(1), **kwargs)


def _without(state, name):
    return {k: v for k, v in state.items() if k != name}


def _with(state, name, value):
    return {**state, name: value}


REFUSED = [
    (lambda: _with(_cp_state(), "bn.0.weight", np.ones(5)), ValueError,
     r"names a reference MMoE checkpoint does not: \['bn.0.weight'\]"),
    (lambda: _with(_cp_state(), "MuMoE.factors.0", np.ones((5, 2))), ValueError,
     r"a reference MuMoE checkpoint does not: \['factors.0', 'factors.1', 'factors.2', 'factors.3'\]"),
    (lambda: _without(_cp_state(), "factors.3"), ValueError, "has 3 factors.k tensors; expected 4"),
    (lambda: _without(_cp_state(), "factors.1"), ValueError, r"is missing \['factors.1'\]"),
    (lambda: _without(_cp_state(), "projs.1"), ValueError, r"has 4 factors.k tensors; expected 3 \(1 expert level"),
    (lambda: _without(_cp_state(), "bn.1.running_var"), ValueError, r"is missing \['bn.1.running_var'\]"),
    (lambda: _without(_cp_state(), "bn.1.running_mean") | {"bn.1.running_var": None}, TypeError,
     r"state_dict\['bn.1.running_var'\] must be an array"),
    (lambda: _with(_cp_state(), "bn.2.running_mean", np.zeros(2)), ValueError, r"has the unexpected \['bn.2'\]"),
    (lambda: _with(_cp_state(), "factors.2", np.ones((6, 2))), ValueError,
     r"state_dict\['factors.2'\] has shape \(6, 2\): its input mode has 6 entries; expected in_dim=4"),
    (lambda: _with(_cp_state(), "factors.1", np.ones((3, 5))), ValueError,
     r"state_dict\['factors.1'\] has shape \(3, 5\); expected \(3, 2\)"),
    (lambda: _with(_cp_state(), "bn.0.running_mean", np.zeros(4)), ValueError,
     r"state_dict\['bn.0.running_mean'\] has shape \(4,\); expected \(5,\)"),
    (lambda: _with(_cp_state(), "bn.0.num_batches_tracked", np.zeros(1)), ValueError,
     r"num_batches_tracked'\] has shape \(1,\); expected \(\)"),
    (lambda: _with(_cp_state(), "projs.1", np.zeros((5, 3))), ValueError,
     r"state_dict\['projs.1'\] has shape \(5, 3\); expected \[4, N_h\]"),
    (lambda: _with(_cp_state(), "core", np.zeros((2, 2, 2))), ValueError,
     r"state_dict\['core'\] has shape \(2, 2, 2\); expected \(2, 2, 2, 2\) \(the Tucker core"),
    (lambda: _with(_tr_state(), "MuMoE.factors.1", np.ones((2, 5, 5))), ValueError,
     r"state_dict\['MuMoE.factors.2'\] has shape \(4, 6, 3\); expected \(5, 6, 3\) \(core 2: .*r_2 = 5 from "
     r"MuMoE.factors.1\)"),
    (lambda: _with(_tr_state(), "MuMoE.factors.2", np.ones((4, 6, 2))), ValueError,
     r"state_dict\['MuMoE.factors.2'\] has shape \(4, 6, 2\); expected \(4, 6, 3\)"),
    (lambda: _without(_tr_state(apply_ln=True), "input_ln.bias"), ValueError, r"is missing \['input_ln.bias'\]"),
    (lambda: _with(_tr_state(apply_ln=True), "input_ln.weight", np.ones(5)), ValueError,
     r"state_dict\['input_ln.weight'\] has shape \(5,\); expected \(4,\)"),
    (lambda: _with(_tr_state(second_dim=3), "MuMoE2.factors.1", np.ones((2, 6, 4))), ValueError,
     r"MuMoE2.factors.1'\] has shape \(2, 6, 4\): its input mode|MuMoE2.factors.1'\] has shape \(2, 6, 4\); expected"),
    (lambda: _with(_tr_state(), "core", np.ones((3, 2, 4))), ValueError, r"does not: \['core'\]"),
    (lambda: [1, 2], TypeError, "state_dict must be a mapping of tensor names to arrays; got"),
    (lambda: {"factors.0": [[1.0]]}, TypeError, r"state_dict\['factors.0'\] must be an array"),
    (lambda: {}, ValueError, "has no name starting with prefix=''"),
]


@pytest.mark.parametrize("make, error, message", REFUSED, ids=[str(i) for i in range(len(REFUSED))])
def test_what_the_reference_would_not_write_is_refused_by_name(make, error, message):
    with pytest.raises(error, match=message):
        read_state_dict(make())


def test_cp_second_layer_rank_must_be_the_first_layers():
    state = reference_state_dict("MuMoE.CPMuMoE", 4, 6, [5], 3, second_dim=4, rng=np.random.default_rng(2))
    state = {**state, **{f"MuMoE2.factors.{k}": np.ones((d, 2)) for k, d in enumerate([5, 7, 4])}}
    with pytest.raises(ValueError, match=r"MuMoE2.factors.k have rank=2; expected the first layer's rank=3"):
        read_state_dict(state)


def test_a_layer_of_a_whole_model_is_read_by_prefix():
    # the nanoGPT experiment: transformer.h.{i}.mlp.MuMoE_layer.<names>, compiled models add _orig_mod.
    ranks = [[4, None, 4], [4, None, 2], [2, None, 4]]
    layer = reference_state_dict("MuMoE.TRMuMoE", 8, 32, [6], ranks, second_dim=8, normalization="ln", apply_ln=True,
                                 rng=np.random.default_rng(3))
    prefix = "_orig_mod.transformer.h.1.mlp.MuMoE_layer."
    model = {"_orig_mod.transformer.wte.weight": np.zeros((3, 8)), **{prefix + k: v for k, v in layer.items()}}
    checkpoint = read_state_dict(model, prefix=prefix)
    assert set(checkpoint.names) == {prefix + k for k in layer}
    assert [c["class"] for c in checkpoint.configs] == ["TRMMoE", "TRMMoE"]
    assert checkpoint.configs[1]["ranks"] == [4, 4, 2, 4]
    with pytest.raises(ValueError, match=r"checkpoint does not: \['_orig_mod.transformer.h.1.mlp.MuMoE_layer.MuMoE.f"):
        read_state_dict(model, prefix="_orig_mod.")


def test_gate_is_checked_and_torch_tensors_are_read_without_copies():
    torch = pytest.importorskip("torch")
    state = {k: torch.as_tensor(v) for k, v in _cp_state().items()}
    checkpoint = read_state_dict(state, gate="softmax")
    assert checkpoint.params[0]["factor_0"] is state["factors.0"]
    assert checkpoint.dtype == "float64" and checkpoint.configs[0]["gate"] == "softmax"
    with pytest.raises(ValueError, match="gate='relu' is not a gate activation"):
        read_state_dict(state, gate="relu")


#: JAX differentiates one case (its first call compiles the whole forward and backward): BatchNorm in training,
#: apply_ln and a two-layer block
JAX_GRADIENT_CASE = "MuMoE.CPMuMoE-expert_dims=[5]-ranks=5-hierarchy=1-second_dim=4-apply_ln=True"
GRADIENT_CASES = [
    pytest.param(b, *case.values, id=f"{b}-{case.id}")
    for b in ("pytorch", "jax") if b in BACKENDS
    for case in CASES if b == "pytorch" or case.id == JAX_GRADIENT_CASE
]


def _gradient(backend, model, params, x, cotangent, training):
    """``d sum(cotangent * y) / d (params, x)`` by the backend's autodiff."""
    shape = cotangent.shape
    if backend == "pytorch":
        import torch

        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        xt = torch.tensor(x, requires_grad=True)
        y, _ = model.apply(leaves, xt, state=model.state, training=training)
        grads = torch.autograd.grad((y.reshape(shape) * torch.tensor(cotangent)).sum(), [*leaves.values(), xt])
        return dict(zip([*leaves, "x"], (g.numpy() for g in grads)))
    import jax
    import jax.numpy as jnp

    def loss(p, xx):
        return (model.apply(p, xx, state=model.state, training=training)[0].reshape(shape) * cotangent).sum()

    gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(dict(params), jnp.asarray(x))
    return {**{k: np.asarray(v) for k, v in gp.items()}, "x": np.asarray(gx)}


@pytest.mark.parametrize("backend, version, kwargs, act, tokens", GRADIENT_CASES)
def test_gradients_equal_the_reference_directional_derivative(backend, version, kwargs, act, tokens):
    """Every parameter's and the input's gradient, along a random direction, in training (3-D x) and evaluation."""
    rng = np.random.default_rng(zlib.crc32(f"grad{version}{kwargs}".encode()))
    state = reference_state_dict(version, **kwargs, rng=rng)
    names = read_state_dict(state, gate=act).names
    with tensormoe.backend_context(backend), float64_on(backend):
        model = from_reference(state, gate=act, dtype="float64")
        for training, x in ((True, rng.normal(size=(3, tokens, kwargs["input_dim"]))),
                            (False, rng.normal(size=(4, kwargs["input_dim"])))):
            want_y, _ = reference_forward(version, state, x, training=training, act=act)
            cotangent = rng.normal(size=want_y.shape)
            direction = {k: rng.normal(size=np.shape(v)) for k, v in state.items() if not k.startswith("bn.")}
            direction["x"] = rng.normal(size=x.shape)
            want, err = reference_directional_derivative(version, state, x, cotangent=cotangent, direction=direction,
                                                         training=training, act=act)
            grads = _gradient(backend, model, model.params, x, cotangent, training)
            ours = {_place(names[k]) if k != "x" else "x": v for k, v in direction.items()}
            products = [grads[k] * v for k, v in ours.items()]
            scale = sum(float(np.abs(p).sum()) for p in products)
            got = sum(float(p.sum()) for p in products)
            assert set(grads) == set(ours)  # a gradient for every parameter and the input
            assert abs(got - want) <= 1e-9 * scale + 10 * err, (got, want, err, scale)
            _record(version, "gradient", abs(got - want) / scale, backend)


def test_zz_measured_differences_are_reported_on_request(capsys):
    """The measured max differences of this run (outputs: absolute; gradients: relative to ``sum |g v|``).

    Printed with ``TENSORMOE_REPORT_REFERENCE=1`` (run the whole module: the other tests record them).
    """
    assert all(np.isfinite(v) and v < 1e-9 for v in MEASURED.values())
    if os.environ.get("TENSORMOE_REPORT_REFERENCE"):
        with capsys.disabled():
            print()
            for (version, what, backend), value in sorted(MEASURED.items()):
                print(f"  {version:16s} {what:8s} {backend:8s} {value:.1e}")
