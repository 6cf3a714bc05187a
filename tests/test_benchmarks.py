"""The benchmark suite (benchmarks/run.py) runs, and its limits compute what the layers compute."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tensormoe
from helpers import BACKENDS

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    """Import ``benchmarks/<name>.py`` (benchmarks/ is scripts, not a package)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return sys.modules[name] if sys.modules[name] is not module else module


chains = _load("chains")
limit_gates = _load("limit_gates")
harness = _load("harness")
cases = _load("cases")
to_numpy = harness.to_numpy

# (kind, expert_dims, ranks, bias): hierarchy 1 and 2 for every format, bias on and off, ranks not all equal
CONFIGS = [
    ("cp", [5], 3, True),
    ("cp", [4, 3], 2, False),
    ("tucker", [5], [3, 4, 2], False),
    ("tucker", [4, 3], [2, 3, 4, 3], True),
    ("tt", [5], [1, 2, 3, 1], True),
    ("tt", [4, 3], [1, 3, 2, 4, 1], False),
    ("tr", [5], [2, 3, 4, 2], False),
    ("tr", [4, 3], [3, 2, 4, 2, 3], True),
]


@pytest.mark.parametrize("kind,dims,ranks,bias", CONFIGS)
def test_hand_chain_equals_layer_and_dense_reference(backend, kind, dims, ranks, bias):
    """The limit (a gate candidate of limit_gates, the framework's LayerNorm, the hand chain; no tensormoe code)
    computes what the layer computes."""
    be = harness.Backend(backend)
    rng = np.random.default_rng(len(dims) * 10 + bias)
    layer = cases.make_layer(kind, 6, 5, dims, ranks, bias=bias, gate="sparsemax", seed=3)
    params = dict(layer.params)
    for h, n in enumerate(dims):  # random gates: the sparse coefficients are not uniform
        params[f"gate_{h}"] = be.array(rng.normal(size=(6, n)).astype("float32"))
    x = be.array(rng.normal(size=(7, 6)).astype("float32"))
    gate = limit_gates.candidates(backend)["numpy-sort" if backend == "pytorch" else "sort"]  # a full sort
    # one compiled program on JAX (the layer's own jit inlines), plain calls elsewhere
    run = be.compile(lambda p, x: (chains.limit_forward(layer, p, x, lambda z: gate(z, "sparsemax")),
                                   layer.apply(p, x), layer.dense_forward(p, x)))
    limit, planned, dense = (to_numpy(y) for y in run(params, x))
    assert np.abs(planned).max() > 1e-3  # a non-trivial output
    np.testing.assert_allclose(limit, planned, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(limit, dense, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gate", ["entmax15", "sparsemax"])
def test_limit_gate_candidates_are_exact_and_differentiable(backend, gate):
    """Each candidate of the limit's gate equals the float64 reference (rows up to 300 experts, ties, scales),
    and on PyTorch and JAX its gradient is the closed-form Jacobian-vector product."""
    be = harness.Backend(backend)
    rng = np.random.default_rng(8)
    z = rng.normal(size=(6, 300)) * np.array([[0.01], [0.3], [1.0], [3.0], [30.0], [1.0]])
    z[5] = np.round(z[5])  # ties
    z32 = z.astype(np.float32)
    ref = limit_gates.reference(z32, gate)
    w = rng.normal(size=z.shape)
    s = np.sqrt(ref) if gate == "entmax15" else (ref > 0).astype(float)
    grad_ref = s * w - s * (s * w).sum(-1, keepdims=True) / s.sum(-1, keepdims=True)
    for name, f in limit_gates.candidates(backend).items():
        np.testing.assert_allclose(to_numpy(f(be.array(z32), gate)), ref, atol=2e-6, err_msg=name)
        if backend == "pytorch":
            import torch

            zt = torch.tensor(z32, requires_grad=True)
            (f(zt, gate) * torch.tensor(w, dtype=torch.float32)).sum().backward()
            np.testing.assert_allclose(zt.grad.numpy(), grad_ref, atol=1e-4, err_msg=name)
        elif backend == "jax":
            import jax
            import jax.numpy as jnp

            g = jax.grad(lambda zz: (f(zz, gate) * jnp.asarray(w, jnp.float32)).sum())(jnp.asarray(z32))
            np.testing.assert_allclose(np.asarray(g), grad_ref, atol=1e-4, err_msg=name)


def test_the_limit_calls_no_tensormoe_code():
    """benchmarks/chains.py and limit_gates.py import nothing of tensormoe (the limit is independent of it),
    nor does the harness that times it."""
    for name in ("chains", "limit_gates", "harness"):
        source = (BENCH / f"{name}.py").read_text()
        assert "tensormoe" not in "".join(line for line in source.splitlines() if "import" in line), name


def test_hand_chain_with_given_coefficients_matches_dense_einsum():
    # independent of the layer's forward: the CP chain against an explicit einsum through W
    layer = cases.make_layer("cp", 4, 3, [5, 2], 3, seed=1)
    rng = np.random.default_rng(0)
    p = {k: np.asarray(v, np.float64) for k, v in layer.params.items()}
    a = [rng.random((6, 5)), rng.random((6, 2))]
    x = rng.normal(size=(6, 4))
    w = np.einsum("nr,mr,ir,or->nmio", p["factor_0"], p["factor_1"], p["factor_2"], p["factor_3"])
    want = np.einsum("bn,bm,bi,nmio->bo", a[0], a[1], x, w[:, :, :4]) + np.einsum("bn,bm,nmo->bo", *a, w[:, :, 4])
    np.testing.assert_allclose(chains.cp_chain(layer, p, x, a), want, rtol=1e-10)


def test_million_rank_makes_about_four_linear_layers():
    r = cases.million_rank(768, 768, [1024, 1024])
    layer = tensormoe.CPMMoE(768, 768, [1024, 1024], rank=r)
    c = layer.cost(64)
    assert 3.5 <= c.flops / c.linear_flops <= 4.5
    assert c.gate_flops > c.forward_flops  # most FLOPs in the two gates


def _finite_timings(node):
    """Every ``{"median_ms", "min_ms"}`` dict under ``node``."""
    if isinstance(node, dict):
        if "median_ms" in node and "min_ms" in node:
            yield node
        for v in node.values():
            yield from _finite_timings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _finite_timings(v)


def test_quick_run(tmp_path):
    out = tmp_path / "r.json"
    done = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--quick", "--out", str(out), "--backends", ",".join(BACKENDS)],
        capture_output=True, text=True, timeout=300, cwd=str(BENCH.parent),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(out.read_text())
    for section in ("limit", "unplanned", "dense", "linear", "million", "scaling", "gates"):
        assert res[section], f"section {section} is empty"
        assert {r["backend"] for r in res[section]} == set(BACKENDS), section
    timings = list(_finite_timings({k: res[k] for k in ("limit", "unplanned", "dense", "linear", "million", "scaling",
                                                        "gates", "peers", "compile", "firstcall")}))
    assert len(timings) > 50
    assert all(math.isfinite(t["median_ms"]) and t["median_ms"] > 0 and t["min_ms"] > 0 for t in timings)
    # every hand chain was checked against the layer, on every backend and format
    checked = {(v["backend"], v["kind"]) for v in res["verified"] if v["ok"]}
    assert checked >= {(b, k) for b in BACKENDS for k in ("cp", "tucker", "tt", "tr", "cp-million")}
    assert any(r.get("skipped") for r in res["dense"])  # the memory cap is applied
    for r in res["million"]:
        assert r["memory"]["bytes"] is not None and r["memory"]["bound_bytes"] < r["dense_w_bytes"]
        if "RSS" not in r["memory"]["method"]:  # tracemalloc / XLA see every buffer; RSS may see none at tiny sizes
            assert r["memory"]["bytes"] > 0
    assert Path(res["plot"]).is_file() and Path(res["plot"]).stat().st_size > 1000
    assert "Planned forward vs the limit" in done.stdout and "target" in done.stdout
    assert res["meta"]["cpu_count"] >= 1 and res["meta"]["sizes"]["I"] > 0
    # the limit's gate is an exact candidate written without tensormoe, chosen by time on every backend
    assert {r["backend"] for r in res["limit_gates"]} == set(BACKENDS)
    for r in res["limit_gates"]:
        assert r["candidates"][r["chosen"]]["exact"]
    assert all(r["limit_gate"] in limit_gates.candidates(r["backend"]) for r in res["limit"])
    if "pytorch" in BACKENDS:
        models = {r["model"] for r in res["peers"]}
        assert {"tensormoe CP", "nn.Linear (I x O)"} <= models
        assert ("unplanned (torch.einsum + entmax)" in models) == (importlib.util.find_spec("entmax") is not None)
        # torch.compile's graph runs the gate kernel (where built) and the lowered program, not torch.einsum
        from tensormoe.gates import KERNEL_AVAILABLE

        layers = [r for r in res["compile"] if r["kernel_in_graph"] is not None]
        assert layers and all(r["kernel_in_graph"] == KERNEL_AVAILABLE and not r["einsum_in_graph"] for r in layers)
    # a new batch size reuses its layer's plan: no search
    assert res["firstcall"] and all(r["new_batch_searches"] == 0 for r in res["firstcall"])


def test_product_keys_section_smoke(monkeypatch):
    """benchmarks/sections/product_keys.py at toy sizes: tensormoe's layers are built, checked and timed."""
    pytest.importorskip("torch")
    section = _load("sections/product_keys")

    def absent(cfg):
        raise ImportError("left out of the smoke test")  # the peers' side is tests/test_routing_reference.py's

    monkeypatch.setattr(section, "peer_layers", absent)
    monkeypatch.setattr(section, "moe_layer", absent)
    monkeypatch.setattr(harness, "MIN_SAMPLING_S", 0.0)
    cfg = {**section.DEFAULTS, "dim": 8, "n": 4, "heads": 2, "k": 2, "dim_key": 4, "moe_dim": 8, "moe_experts": 4,
           "moe_hidden": 8, "batches": [4], "repeats": 1, "row_budget_s": 0.05}
    out = {}
    section.section_product_keys(harness.Backend("pytorch"), cfg, out)
    models = {r["model"] for r in out["product_keys"]}
    assert any(m.startswith("tensormoe product-key CP 4^2") for m in models)
    assert sum(m.startswith("tensormoe top-2 CP gshard") for m in models) == 2
    for r in out["product_keys"]:
        assert r["forward"]["median_ms"] > 0 and r["backward"]["median_ms"] > 0
        if r["model"].startswith("tensormoe product-key"):
            assert r["params"] == section.pk_cp_params(8, 4, section.matched_active_rank(8, 2, 2), 2, 4)
