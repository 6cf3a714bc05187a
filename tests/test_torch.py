"""The torch.nn.Module shells: parameters, autograd, dtype/device moves, state_dict, torch.compile, CUDA."""

from __future__ import annotations

import copy
import warnings
import io as _io
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tensormoe  # noqa: E402
from tensormoe import torch as tmt  # noqa: E402
from tensormoe.layer import layer_from_config  # noqa: E402

MODULES = {
    "cp": lambda **kw: tmt.CPMMoE(6, 5, [4, 3], rank=3, **kw),
    "tucker": lambda **kw: tmt.TuckerMMoE(6, 5, [4, 3], ranks=[2, 3, 4, 3], **kw),
    "tt": lambda **kw: tmt.TTMMoE(6, 5, [4, 3], ranks=3, **kw),
    "tr": lambda **kw: tmt.TRMMoE(6, 5, [4, 3], ranks=2, **kw),
}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def randomise_gates(module, seed=0):
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in module.params.items():
            if name.startswith("gate_"):
                p.copy_(torch.tensor(rng.normal(size=p.shape)))
    return module


def numpy_reference(module, x):
    """The functional layer on NumPy with the module's parameters (an independent backend)."""
    params = {k: v.detach().cpu().float().numpy() for k, v in module.params.items()}
    with tensormoe.backend_context("numpy"):
        return module.layer.apply(params, x.detach().cpu().float().numpy())


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_parameters_are_the_functional_layers(kind):
    module = MODULES[kind]()
    assert isinstance(module, torch.nn.Module)
    shapes = module.layer.param_shapes()
    assert {n: tuple(p.shape) for n, p in module.params.items()} == shapes
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in module.parameters())
    assert sum(p.numel() for p in module.parameters()) == module.layer.n_params
    # same seed, same weights as the functional layer on NumPy
    with tensormoe.backend_context("numpy"):
        core = layer_from_config(module.layer.config())
    for name, value in core.params.items():
        np.testing.assert_array_equal(module.params[name].detach().numpy(), value)


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_forward_equals_numpy_and_gradients_reach_every_parameter(kind):
    module = randomise_gates(MODULES[kind]())
    # later expert levels start as all ones (no effect at init), which makes the true gradient of their
    # gates exactly zero (the coefficients sum to one): perturb every parameter so none is zero by symmetry
    with torch.no_grad():
        for p in module.params.values():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x = torch.randn(2, 3, 6)
    y = module(x)
    assert y.shape == (2, 3, 5)
    np.testing.assert_allclose(y.detach().numpy(), numpy_reference(module, x), rtol=1e-5, atol=1e-6)
    (y**2).sum().backward()
    for name, p in module.params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


@pytest.mark.parametrize("flag", tensormoe.available_backends())
def test_module_computes_on_torch_whatever_the_flag(flag):
    module = MODULES["cp"]()
    x = torch.randn(4, 6)
    expected = module(x).detach()
    with tensormoe.backend_context(flag):
        y = module(x)
        assert isinstance(y, torch.Tensor) and y.requires_grad
        torch.testing.assert_close(y.detach(), expected)
        torch.testing.assert_close(module.dense_forward(x).detach(), expected, rtol=1e-5, atol=1e-5)


def test_wrong_inputs_name_the_argument():
    module = MODULES["cp"]()
    message = (
        r"x is a numpy array but this call computes on .pytorch. \(backend=.pytorch.\); convert it to a pytorch array"
    )
    with pytest.raises(TypeError, match=message):
        module(np.ones((2, 6), dtype="float32"))
    with pytest.raises(TypeError, match=r"x has dtype float64; expected float32, the dtype of the layer's parameters"):
        module(torch.ones(2, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 6\]; got shape \(2, 5\)"):
        module(torch.ones(2, 5))


@pytest.mark.parametrize("dtype", ["float64", "bfloat16", "float16"])
def test_dtype_moves(dtype):
    module = randomise_gates(MODULES["tr"]())
    x = torch.randn(4, 6)
    expected = copy.deepcopy(module).double()(x.double()).detach()
    moved = {"float64": module.double, "bfloat16": module.bfloat16, "float16": module.half}[dtype]()
    target = getattr(torch, dtype)
    assert all(p.dtype == target for p in moved.parameters()) and moved.config()["dtype"] == dtype
    y = moved(x.to(target))
    assert y.dtype == target
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == target for p in moved.parameters())
    # rounding of the weights and of every product: a few units of the dtype's precision
    eps = {"float64": 2.0**-52, "bfloat16": 2.0**-7, "float16": 2.0**-10}[dtype]
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=64 * eps * float(expected.abs().max() + 1))
    with pytest.raises(TypeError, match=f"expected {dtype}, the dtype of the layer's parameters"):
        moved(x)


def test_state_dict_round_trip():
    source = randomise_gates(MODULES["tucker"](seed=1), seed=3)
    target = MODULES["tucker"](seed=2)
    x = torch.randn(5, 6)
    assert not torch.allclose(source(x), target(x))
    state = source.state_dict()
    assert sorted(state) == sorted(f"params.{name}" for name in source.layer.param_shapes())
    buffer = _io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    target.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
    # the functional layer sees the loaded parameters too
    torch.testing.assert_close(target.layer.apply(None, x, backend="pytorch"), source(x), rtol=0, atol=0)


def test_deepcopy_and_pickle_keep_weights_separate():
    module = MODULES["tt"]()
    x = torch.randn(3, 6)
    module(x)  # fills the functional layer's caches
    twin = copy.deepcopy(module)
    buffer = _io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        twin.params["factor_0"].mul_(2)
    torch.testing.assert_close(loaded(x), module(x), rtol=0, atol=0)
    assert not torch.allclose(twin(x), module(x))


def test_training_step_lowers_the_loss():
    torch.manual_seed(0)
    module = MODULES["cp"]()
    x, target = torch.randn(32, 6), torch.randn(32, 5)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.05)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(module(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_wrap_copies_a_functional_layer_from_any_backend():
    with tensormoe.backend_context("numpy"):
        core = tensormoe.TRMMoE(6, 5, [4], ranks=2, seed=4)
        x = np.random.default_rng(0).normal(size=(3, 6)).astype("float32")
        expected = core(x)
    module = tmt.wrap(core)
    assert type(module) is tmt.TRMMoE
    np.testing.assert_allclose(module(torch.from_numpy(x)).detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="layer must be a CPMMoE; got TRMMoE"):
        tmt.CPMMoE.from_layer(core)


def test_mlp_block_shares_the_first_layers_coefficients():
    first = randomise_gates(tmt.CPMMoE(6, 8, [4], rank=3, seed=1))
    second = tmt.TTMMoE(8, 6, [4], ranks=2, seed=2)
    mlp = tmt.MMoEMLP(first, second)
    x = torch.randn(2, 3, 6)
    y = mlp(x)
    # independent reference on NumPy: a from the first layer's gates, reused by the second
    xn = x.numpy()
    p1 = {k: v.detach().numpy() for k, v in first.params.items()}
    p2 = {k: v.detach().numpy() for k, v in second.params.items()}
    with tensormoe.backend_context("numpy"):
        a = first.layer.coefficients(p1, xn)
        h = first.layer.apply(p1, xn, a)
        h = 0.5 * h * (1 + np.vectorize(math.erf)(h / np.sqrt(2)))
        expected = second.layer.apply(p2, h.astype("float32"), a)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-4, atol=1e-5)
    y.sum().backward()
    assert first.params["gate_0"].grad.abs().max() > 0
    assert second.params["gate_0"].grad is None and not second.params["gate_0"].requires_grad
    with pytest.raises(ValueError, match=r"first.expert_dims=\[4\] and second.expert_dims=\[5\]"):
        tmt.MMoEMLP(first, tmt.CPMMoE(8, 6, [5], rank=2))
    with pytest.raises(ValueError, match="first.out_dim=8 must equal second.in_dim=7"):
        tmt.MMoEMLP(first, tmt.CPMMoE(7, 6, [4], rank=2))


def test_torch_compile_full_graph():
    """One graph (fullgraph=True), same outputs and gradients; a new batch size recompiles cleanly.

    Tracing warns of nothing in tensormoe's code (an ``lru_cache`` on the way made Dynamo warn once).
    """
    torch._dynamo.reset()
    module = randomise_gates(MODULES["cp"]())
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    for shape in [(4, 6), (2, 3, 6)]:
        x = torch.randn(*shape)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = compiled(x)
        assert not [str(w.message) for w in caught if "lru_cache" in str(w.message)]
        torch.testing.assert_close(y, module(x), rtol=1e-5, atol=1e-6)
        grads = torch.autograd.grad(y.sum(), list(module.parameters()))
        expected = torch.autograd.grad(module(x).sum(), list(module.parameters()))
        for g, e in zip(grads, expected):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


# --- CUDA (runs where a GPU is present) ------------------------------------------------


@cuda
@pytest.mark.parametrize("kind", sorted(MODULES))
def test_cuda_forward_backward_equal_cpu(kind):
    cpu = randomise_gates(MODULES[kind]())
    gpu = copy.deepcopy(cpu).to("cuda")
    assert all(p.device.type == "cuda" for p in gpu.parameters())
    x = torch.randn(8, 6)
    y_cpu, y_gpu = cpu(x), gpu(x.cuda())
    assert y_gpu.device.type == "cuda"
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-5)
    y_cpu.sum().backward()
    y_gpu.sum().backward()
    for name in cpu.params:
        torch.testing.assert_close(gpu.params[name].grad.cpu(), cpu.params[name].grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gpu.dense_forward(x.cuda()).cpu(), y_cpu.detach(), rtol=1e-4, atol=1e-5)


@cuda
def test_cuda_constructor_device_bfloat16_and_compile():
    module = tmt.CPMMoE(6, 5, [4, 3], rank=3, device="cuda").bfloat16()
    x = torch.randn(8, 6, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(module, fullgraph=True)
    torch.testing.assert_close(compiled(x), module(x), rtol=2e-2, atol=2e-2)


def test_wrap_keeps_router_objects():
    from tensormoe.routers import TopKRouter

    with tensormoe.backend_context("numpy"):
        core = tensormoe.CPMMoE(6, 5, [4], rank=3, router=TopKRouter(k=2, noise=None), seed=2)
        x = np.random.default_rng(0).normal(size=(3, 6)).astype("float32")
        expected = core(x)
    module = tmt.wrap(core)
    assert repr(module.layer.routers) == repr(core.routers)
    np.testing.assert_allclose(module(torch.from_numpy(x)).detach().numpy(), expected, rtol=1e-5, atol=1e-6)
