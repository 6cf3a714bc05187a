"""The PyTorch and JAX shells pass every keyword of the functional layer's forward on.

``mask=``, ``routing=``, ``return_routing=`` and training noise (``training=True``
with an integer seed, the same noise on every backend) given to a shell give what
the functional layer gives on the same (random) parameters; ``MMoEMLP`` with a
selecting router runs the routed forward.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import random_params
from hypothesis import given, settings
from hypothesis import strategies as st

import tensormoe
from tensormoe.layers import make_layer

SHELLS = {"pytorch": "tensormoe.torch", "jax": "tensormoe.jax"}
RANKS = {"cp": 3, "tucker": 2, "tt": 2, "tr": 2}
ROUTERS = ["top1", "top2", "expert_choice", "soft", "entmax15"]


def _shell(backend):
    pytest.importorskip("torch" if backend == "pytorch" else "jax")
    import importlib

    return importlib.import_module(SHELLS[backend])


def _as_numpy(value):
    return np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)


def _case(backend, kind, router, seed):
    """A shell with random parameters, the functional layer holding the same ones, an input and a mask."""
    shells = _shell(backend)
    rng = np.random.default_rng(seed)
    core = make_layer(kind, 4, 3, [4], RANKS[kind], router=router, seed=seed)
    with tensormoe.backend_context(backend):
        core.params = random_params(core, seed)
        ops = tensormoe.frameworks.get_ops()
        x = ops.asarray(rng.normal(size=(2, 5, 4)), "float32")
        mask = ops.asarray(rng.random(size=(2, 5)) < 0.7, "float32")
    return shells.wrap(core), core, x, mask


def _close(a, b):
    np.testing.assert_allclose(_as_numpy(a), _as_numpy(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", list(SHELLS))
@settings(max_examples=5, deadline=None)
@given(kind=st.sampled_from(sorted(RANKS)), router=st.sampled_from(ROUTERS), seed=st.integers(0, 2**16))
def test_shell_forward_keywords_equal_the_functional_layer(backend, kind, router, seed):
    shell, core, x, mask = _case(backend, kind, router, seed)
    with tensormoe.backend_context(backend):
        params = core.params
        # mask=
        _close(shell(x, mask=mask), core.apply(params, x, mask=mask))
        # training noise from an integer seed
        _close(shell(x, training=True, rng=seed), core.apply(params, x, training=True, rng=seed))
        # return_routing= and routing=
        y, routing = shell(x, mask=mask, return_routing=True)
        y_core, routing_core = core.apply(params, x, mask=mask, return_routing=True)
        _close(y, y_core)
        for r, r_core in zip(routing, routing_core):
            _close(r.weights, r_core.weights)
            _close(r.load_balancing_loss, r_core.load_balancing_loss)
        _close(shell(x, routing=routing), y_core)
        routed = shell.route(x, mask=mask)
        _close(shell.dense_forward(x, routing=routed), core.dense_forward(params, x, routing=routing_core))


@pytest.mark.parametrize("backend", list(SHELLS))
def test_shells_reject_what_the_functional_layer_rejects(backend):
    shell, core, x, mask = _case(backend, "cp", "top2", 0)
    with tensormoe.backend_context(backend):
        with pytest.raises(ValueError, match="rng="):
            shell(x, training=True)
        with pytest.raises(ValueError, match="mask must have shape"):
            shell(x, mask=mask[:1])


@pytest.mark.parametrize("router", ["top2", "expert_choice", "soft"])
def test_torch_mlp_with_a_selecting_router_runs_the_routed_forward(router, monkeypatch):
    torch = pytest.importorskip("torch")
    from tensormoe import torch as tmt

    first = tmt.CPMMoE(4, 6, [4], rank=2, router=router, seed=1)
    second = tmt.TRMMoE(6, 3, [4], ranks=2, router=router, seed=2)
    with torch.no_grad():
        for module, seed in ((first, 3), (second, 4)):
            for name, value in random_params(module.layer, seed).items():
                module.params[name].copy_(torch.as_tensor(np.asarray(value)))
    mlp = tmt.MMoEMLP(first, second)
    x = torch.as_tensor(np.random.default_rng(5).normal(size=(2, 5, 4)), dtype=torch.float32)

    def dense_coefficients(*args, **kwargs):
        raise AssertionError("MMoEMLP fell back to dense coefficients")

    monkeypatch.setattr(tmt.MMoE, "coefficients", dense_coefficients)
    y, routing = mlp(x, return_routing=True)
    expected = second(torch.nn.functional.gelu(first(x, routing=routing)), routing=routing)
    _close(y, expected)
    _close(mlp(x), expected)
    mask = torch.as_tensor(np.random.default_rng(6).random(size=(2, 5)) < 0.5)
    masked = mlp.first.route(x, mask=mask)
    _close(mlp(x, mask=mask), second(torch.nn.functional.gelu(first(x, routing=masked)), routing=masked))


@pytest.mark.parametrize("backend", list(SHELLS))
def test_wrapping_leaves_the_functional_layer_alone(backend):
    """A shell's parameters are its own: wrapping does not move the functional layer's parameters."""
    shells = _shell(backend)
    core = tensormoe.TTMMoE(4, 3, [5], ranks=2, seed=1)
    before = {name: np.array(value) for name, value in core.params.items()}
    shells.wrap(core)
    assert all(type(value) is np.ndarray for value in core.params.values())
    for name, value in before.items():
        np.testing.assert_array_equal(core.params[name], value)
