"""BatchNorm gates in the layers and shells (issue 14): ``gate_norm="batchnorm"`` against the float64 reference model.

PyTorch modules keep the running statistics in buffers and follow ``module.train()``/``.eval()``; JAX takes
and returns them explicitly (also under ``jax.jit``); NumPy evaluates with them.  Expected values come from
``tests/reference_model.py``.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from reference_model import reference_forward, reference_state_dict
from test_reference_model import CASES

import tensormoe
from helpers import float64_on, to_numpy
from tensormoe.tools.reference import read_state_dict

TOL = dict(rtol=1e-12, atol=1e-12)
pytestmark = pytest.mark.filterwarnings("ignore::tensormoe.network.factorizations.RankWarning")

#: the cases a torch module holds: all but a single layer with apply_ln (tensormoe.tools.reference.from_reference has it)
TORCH_CASES = [c for c in CASES if not (c.values[1].get("apply_ln") and not c.values[1].get("second_dim"))]


def _state(version, kwargs):
    return reference_state_dict(version, **kwargs, rng=np.random.default_rng(zlib.crc32(f"s{version}{kwargs}".encode())))


@pytest.mark.parametrize("version, kwargs, act, tokens", TORCH_CASES)
def test_torch_module_follows_train_and_eval_like_the_reference(version, kwargs, act, tokens):
    torch = pytest.importorskip("torch")
    from tensormoe.torch import from_reference

    state = _state(version, kwargs)
    model = from_reference({k: torch.as_tensor(v) for k, v in state.items()}, gate=act)
    assert model.training  # as a freshly built reference module
    rng = np.random.default_rng(1)
    stats = {k: v for k, v in state.items() if k.startswith("bn.")}
    for training, x in ((True, rng.normal(size=(5, kwargs["input_dim"]))),
                        (True, rng.normal(size=(2, tokens, kwargs["input_dim"]))),
                        (False, rng.normal(size=(3, kwargs["input_dim"])))):
        model.train(training)
        got = model(torch.as_tensor(x)).detach().numpy()
        want, stats = reference_forward(version, state, x, training=training, act=act, running_stats=stats)
        assert got.shape == (*x.shape[:-1], want.shape[-1])
        np.testing.assert_allclose(got.reshape(want.shape), want, **TOL)
        buffers = dict(model.named_buffers())
        prefix = "first." if "first.params.factor_0" in dict(model.named_parameters()) else ""
        for name, value in stats.items():
            h, field = name.split(".")[1:]
            np.testing.assert_allclose(buffers[f"{prefix}norms.{h}.{field}"].numpy(), value, **TOL)


@pytest.mark.parametrize("backend", tensormoe.available_backends())
def test_functional_layer_with_batchnorm_gates_on_every_backend(backend):
    """The functional layer: explicit statistics in and out in training, its own in evaluation."""
    state = reference_state_dict("MMoE.CPMMoE", 4, 6, [5, 3], rank=4, hierarchy=2, rng=np.random.default_rng(2))
    checkpoint = read_state_dict(state)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, 4))
    with tensormoe.backend_context(backend), float64_on(backend):
        ops = tensormoe.frameworks.get_ops(backend)
        layer = tensormoe.layers.layer_from_config({**checkpoint.configs[0], "dtype": "float64"})
        layer.params = {k: ops.asarray(v, "float64") for k, v in checkpoint.params[0].items()}
        layer.norm_state = tuple(type(s)(*(ops.asarray(np.asarray(a)) for a in s)) for s in checkpoint.gate_norm_state)
        xb = ops.asarray(x, "float64")
        y, new = layer.apply(layer.params, xb, training=True, return_norm_state=True)
        want, want_stats = reference_forward("MMoE.CPMMoE", state, x, training=True)
        np.testing.assert_allclose(to_numpy(y).reshape(want.shape), want, **TOL)
        for h, s in enumerate(new):
            np.testing.assert_allclose(to_numpy(s.mean), want_stats[f"bn.{h}.running_mean"], **TOL)
        # evaluation: the layer's own statistics (unchanged by the call above: they were returned, not kept)
        np.testing.assert_allclose(to_numpy(layer(xb)).reshape(want.shape),
                                   reference_forward("MMoE.CPMMoE", state, x, training=False)[0], **TOL)
        y2 = layer.apply(layer.params, xb, norm_state=new)
        np.testing.assert_allclose(to_numpy(y2).reshape(want.shape),
                                   reference_forward("MMoE.CPMMoE", state, x, training=False,
                                                     running_stats=want_stats)[0], **TOL)
        with pytest.raises(ValueError, match="needs return_norm_state=True"):
            layer.apply(layer.params, xb, training=True)


def test_jax_state_is_explicit_under_jit():
    jax = pytest.importorskip("jax")
    from tensormoe.jax import CPMMoE

    layer = CPMMoE(4, 3, [5], rank=2, gate_norm="batchnorm")
    rng = np.random.default_rng(4)
    layer = layer.replace({**layer.params, "gate_0": jax.numpy.asarray(rng.normal(size=(4, 5)), dtype="float32")})
    x = jax.numpy.asarray(rng.normal(size=(6, 4)), dtype="float32")
    step = jax.jit(lambda p, s, x: layer.apply(p, x, norm_state=s, training=True, return_norm_state=True))
    y, state = step(layer.params, layer.norm_state, x)
    y2, state2 = step(layer.params, state, x)
    assert [int(s.count) for s in state2] == [2]
    assert float(np.abs(np.asarray(state2[0].mean)).max()) > 1e-3  # the statistics moved
    np.testing.assert_allclose(np.asarray(state2[0].mean), 0.19 * np.asarray(x @ layer.params["gate_0"]).mean(0),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: tensormoe.CPMMoE(4, 3, [5], rank=2, gate_norm="batchnorm", router="top1"), "expected router=None"),
        (lambda: tensormoe.CPMMoE(4, 3, [5], rank=2).apply(None, np.ones((2, 4), "float32"), return_norm_state=True),
         "return_norm_state=True returns BatchNorm statistics"),
        (lambda: tensormoe.CPMMoE(4, 3, [5], rank=2, gate_norm="batchnorm").apply(
            None, np.ones((1, 4), "float32"), training=True, return_norm_state=True), "more than one row"),
    ],
)
def test_batchnorm_misuse_is_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_torch_buffers_move_with_the_module_and_survive_a_state_dict_round_trip():
    torch = pytest.importorskip("torch")
    from tensormoe.torch import CPMMoE

    layer = CPMMoE(4, 3, [5], rank=2, gate_norm="batchnorm")
    layer(torch.randn(8, 4))
    copy = CPMMoE(4, 3, [5], rank=2, gate_norm="batchnorm")
    copy.load_state_dict(layer.state_dict())
    x = torch.randn(3, 4)
    assert torch.equal(copy.eval()(x), layer.eval()(x))
    assert int(copy.norms[0].num_batches_tracked) == 1
    assert layer.double().norms[0].running_mean.dtype == torch.float64


@pytest.mark.parametrize(
    "backend, suffix",
    # JAX: one format (each new layer compiles there); the formats differ in the file, not the backend
    [(b, f) for b in tensormoe.available_backends() for f in ("safetensors", "npz") if b != "jax" or f == "npz"],
)
def test_running_statistics_are_saved_and_loaded_with_the_weights(backend, suffix, tmp_path):
    rng = np.random.default_rng(5)
    with tensormoe.backend_context(backend):
        ops = tensormoe.frameworks.get_ops(backend)
        layer = tensormoe.TRMMoE(4, 3, [5, 2], ranks=2, gate_norm="batchnorm")
        layer.params = {**layer.params, "gate_0": ops.asarray(rng.normal(size=(4, 5)), "float32")}
        x = ops.asarray(rng.normal(size=(7, 4)), "float32")
        _, layer.norm_state = layer.apply(None, x, training=True, return_norm_state=True)
        layer.norm_state = tuple(s._replace(count=s.count + 41) for s in layer.norm_state)
        path = tmp_path / f"w.{suffix}"
        tensormoe.io.save(layer, path)
        fresh = tensormoe.io.load(tensormoe.TRMMoE(4, 3, [5, 2], ranks=2, gate_norm="batchnorm"), path)
        rebuilt = tensormoe.io.layer_from_file(path)
        for other in (fresh, rebuilt):
            for mine, theirs in zip(layer.norm_state, other.norm_state):
                np.testing.assert_array_equal(to_numpy(theirs.mean), to_numpy(mine.mean))
                np.testing.assert_array_equal(to_numpy(theirs.var), to_numpy(mine.var))
                assert int(to_numpy(theirs.count)) == 42
            np.testing.assert_array_equal(to_numpy(other(x)), to_numpy(layer(x)))  # evaluation: the statistics


def test_torch_buffers_are_saved_and_loaded(tmp_path):
    torch = pytest.importorskip("torch")
    from tensormoe.torch import TRMMoE

    module = TRMMoE(4, 3, [5], ranks=2, gate_norm="batchnorm")
    with torch.no_grad():
        module.params["gate_0"].normal_()
    module(torch.randn(9, 4))
    tensormoe.io.save(module, tmp_path / "m.safetensors")
    other = tensormoe.io.load(TRMMoE(4, 3, [5], ranks=2, gate_norm="batchnorm"), tmp_path / "m.safetensors")
    for name, value in module.named_buffers():
        assert torch.equal(dict(other.named_buffers())[name], value), name
    with pytest.raises(ValueError, match=r"gate_norm='batchnorm' \(the layer has 'layernorm'\)"):
        tensormoe.io.load(TRMMoE(4, 3, [5], ranks=2), tmp_path / "m.safetensors")


def test_a_module_trains_its_own_statistics_not_its_functional_layers():
    torch = pytest.importorskip("torch")
    from tensormoe.torch import CPMMoE

    with tensormoe.backend_context("pytorch"):
        core = tensormoe.CPMMoE(4, 3, [5], rank=2, gate_norm="batchnorm", seed=1)
        core.params = {**core.params, "gate_0": torch.randn(4, 5)}
    before = [to_numpy(a).copy() for a in core.norm_state[0]]
    module = CPMMoE.from_layer(core)
    module(torch.randn(8, 4))
    assert int(module.norms[0].num_batches_tracked) == 1
    for old, now in zip(before, core.norm_state[0]):
        np.testing.assert_array_equal(to_numpy(now), old)
