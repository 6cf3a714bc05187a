"""Checks of the float64 reference model (tests/reference_model.py) that the issue-14 tests rely on.

Two kinds of check:

* everywhere (CI included): the factorized model equals the dense equation of the reference
  (``y = sum W[n.., i, o] a_1[n_1] .. a_H[n_H] x[i]`` plus the coefficient-mixed bias row), with
  ``W`` rebuilt by TensorLy; 1.5-entmax solves its threshold equation; BatchNorm statistics
  follow their definition; the finite-difference gradient reference is exact where ``y`` is
  linear; malformed state dicts are refused by name;
* where the reference repository's mirror is present (not in CI): the reference's own modules,
  loaded from every distinct version of ``MMoE.py`` and ``MuMoE.py`` in its git history into a
  temporary folder (never vendored), load the model's state dicts strictly and give the same
  outputs and BatchNorm buffers in training and in evaluation, to 1e-10 in float64, and their
  autograd gradients (every parameter and the input) agree with the model's directional
  derivatives to 1e-9 relative.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from reference_model import (
    BN_EPS,
    BN_MOMENTUM,
    MAX_HIERARCHY,
    VERSIONS,
    entmax15,
    gelu,
    reference_config,
    reference_directional_derivative,
    reference_forward,
    reference_shapes,
    reference_state_dict,
)

REFERENCE_REPO = Path(os.environ.get("TENSORMOE_REFERENCE_REPO", "/work/.mirror/james-oldfield+muMoE/repo"))
TOL = 1e-10


def _case(version, kwargs, act="entmax15", tokens=3):
    ident = f"{version}-" + "-".join(f"{k}={v}" for k, v in kwargs.items() if k not in ("input_dim", "output_dim"))
    ident += ("" if act == "entmax15" else f"-{act}") + ("" if tokens == 3 else f"-T={tokens}")
    return pytest.param(version, kwargs, act, tokens, id=ident.replace(" ", ""))


def _tt(bonds, dims):
    return [[bonds[k], dims[k], bonds[k + 1]] for k in range(len(dims))]


def _cases():
    io = {"input_dim": 4, "output_dim": 6}
    cases = []
    for h in range(1, 5):
        experts = [5, 3, 2, 2][:h]
        cases.append(_case("MMoE.CPMMoE", dict(io, expert_dims=experts, rank=7, hierarchy=h)))
        cases.append(_case("MMoE.TuckerMMoE", dict(io, expert_dims=experts, ranks=[3, 4, 2, 3, 6, 5][-(h + 2):],
                                                    hierarchy=h)))
        for r0 in (1, 3):  # TT and TR
            bonds = [r0, 2, 4, 3, 2, 3][: h + 2] + [r0]
            cases.append(_case("MMoE.TTMMoE", dict(io, expert_dims=experts, ranks=_tt(bonds, [None] * (h + 2)),
                                                   hierarchy=h)))
    cases.append(_case("MMoE.CPMMoE", dict(io, expert_dims=[5, 3], rank=4, use_bias=False, hierarchy=2)))
    cases.append(_case("MMoE.TTMMoE", dict(io, expert_dims=[5], ranks=_tt([2, 3, 4, 2], [5, 4, 6]), use_bias=0)))
    cases.append(_case("MMoE.CPMMoE", dict(io, expert_dims=[5], rank=3), act="softmax"))
    cases.append(_case("MMoE.CPMMoE", dict(io, expert_dims=[5], rank=3), tokens=1))
    for version, ranks in (("MuMoE.CPMuMoE", 5), ("MuMoE.TRMuMoE", None)):
        for h in (1, 2):
            experts = [5, 3][:h]
            r = ranks if ranks else _tt([3, 2, 4, 3][: h + 2] + [3], [None] * (h + 2))
            base = dict(io, expert_dims=experts, ranks=r, hierarchy=h)
            cases.append(_case(version, base))
            cases.append(_case(version, dict(base, normalization="ln")))
            cases.append(_case(version, dict(base, second_dim=4, apply_ln=True)))
            cases.append(_case(version, dict(base, second_dim=3, normalization="ln", use_bias=False)))
        r = ranks if ranks else _tt([1, 2, 4, 1], [None] * 3)  # TRMuMoE with boundary rank 1 (a TT)
        cases.append(_case(version, dict(io, expert_dims=[5], ranks=r, apply_ln=True), act="softmax"))
    # the reference README's own configurations (n_experts=32, in 4, out 8)
    readme = {"input_dim": 4, "output_dim": 8}
    cases += [
        _case("MMoE.CPMMoE", dict(readme, expert_dims=[32], rank=32)),
        _case("MMoE.CPMMoE", dict(readme, expert_dims=[32, 2], rank=32, hierarchy=2)),
        _case("MMoE.TuckerMMoE", dict(readme, expert_dims=[32], ranks=[8, 8, 8])),
        _case("MMoE.TuckerMMoE", dict(readme, expert_dims=[32, 2], ranks=[8, 8, 8, 8], hierarchy=2)),
        _case("MMoE.TTMMoE", dict(readme, expert_dims=[32], ranks=[[1, 32, 4], [4, 4, 4], [4, 8, 1]])),
        _case("MMoE.TTMMoE", dict(readme, expert_dims=[32], ranks=[[4, 32, 4], [4, 4, 4], [4, 8, 4]])),
        _case("MMoE.TTMMoE", dict(readme, expert_dims=[32, 2], ranks=[[4, 32, 4], [4, 32, 4], [4, 4, 4], [4, 8, 4]],
                                  hierarchy=2)),
        _case("MuMoE.CPMuMoE", dict(readme, expert_dims=[32], ranks=32)),
        _case("MuMoE.CPMuMoE", dict(readme, expert_dims=[32, 2], ranks=32, hierarchy=2)),
        _case("MuMoE.TRMuMoE", dict(readme, expert_dims=[32], ranks=[[4, 32, 4], [4, 4, 4], [4, 8, 4]])),
        _case("MuMoE.TRMuMoE", dict(readme, expert_dims=[32, 2], ranks=[[4, 32, 4], [4, 32, 4], [4, 4, 4], [4, 8, 4]],
                                    hierarchy=2)),
    ]
    return cases


CASES = _cases()


def _inputs(rng, cfg, tokens):
    """A 2-D batch and a 3-D batch; the 2-D one has 5 rows so BatchNorm has a batch."""
    return rng.normal(size=(5, cfg["input_dim"])), rng.normal(size=(2, tokens, cfg["input_dim"]))


# -- the model against the dense equation (runs everywhere) ------------------------------------


def _dense_weight(cfg, state, prefix):
    import tensorly as tl

    h = cfg["hierarchy"]
    factors = [state[f"{prefix}factors.{k}"] for k in range(h + 2)]
    with tl.backend_context("numpy"):
        if cfg["fmt"] == "cp":
            return tl.cp_to_tensor((np.ones(factors[0].shape[1]), factors))
        if cfg["fmt"] == "tucker":
            return tl.tucker_to_tensor((state["core"], factors))
        return tl.tr_to_tensor(factors)  # a TT is a ring with boundary rank 1


def _dense_layer(cfg, w, coeffs, z):
    """``sum_{n.., i} W[n.., i, o] prod_h a_h[n_h] z[i]`` (+ ``sum_n W[n.., I, o] prod_h a_h[n_h]``), written out."""
    h = len(coeffs)
    letters = "cdef"[:h]
    spec = ",".join(["bt" + c for c in letters])
    n_in = z.shape[-1]
    y = np.einsum(f"{letters}io,{spec},bti->bto", w[..., :n_in, :], *coeffs, z)
    if cfg["bias"]:
        y = y + np.einsum(f"{letters}o,{spec}->bto", w[..., n_in, :], *coeffs)
    return y


@pytest.mark.parametrize(("version", "kwargs", "act", "tokens"), CASES)
def test_model_equals_dense_equation_in_eval(version, kwargs, act, tokens):
    rng = np.random.default_rng(zlib.crc32(f"{version}{kwargs}{act}{tokens}".encode()))
    cfg = reference_config(version, **kwargs, act=act)
    state = reference_state_dict(version, **kwargs, rng=rng)
    x2, x3 = _inputs(rng, cfg, tokens)
    for x in (x2, x3):
        y, stats = reference_forward(version, state, x, training=False, act=act)
        xt = x if x.ndim == 3 else x[:, None, :]
        coeffs = []
        for k in range(cfg["hierarchy"]):
            logits = xt @ state[f"projs.{k}"]
            if cfg["normalization"] == "bn":
                logits = (logits - state[f"bn.{k}.running_mean"]) / np.sqrt(state[f"bn.{k}.running_var"] + BN_EPS)
            else:
                logits = (logits - logits.mean(-1, keepdims=True)) / np.sqrt(logits.var(-1, keepdims=True) + 1e-5)
            e = np.exp(logits - logits.max(-1, keepdims=True))
            coeffs.append(entmax15(logits) if act == "entmax15" else e / e.sum(-1, keepdims=True))
        z = xt
        if cfg["apply_ln"]:
            z = (xt - xt.mean(-1, keepdims=True)) / np.sqrt(xt.var(-1, keepdims=True) + 1e-5)
            z = z * state["input_ln.weight"] + state["input_ln.bias"]
        prefix = "MuMoE." if cfg["wrapper"] else ""
        expected = _dense_layer(cfg, _dense_weight(cfg, state, prefix), coeffs, z)
        if cfg["second_dim"]:
            expected = _dense_layer(cfg, _dense_weight(cfg, state, "MuMoE2."), coeffs, gelu(expected))
        if not cfg["wrapper"] and expected.shape[1] == 1:
            expected = expected[:, 0]
        assert y.shape == expected.shape
        np.testing.assert_allclose(y, expected, rtol=0, atol=1e-12 * max(1.0, np.abs(expected).max()))
        for key, value in stats.items():
            np.testing.assert_array_equal(value, state[key])  # eval leaves the statistics alone


@pytest.mark.parametrize(("version", "kwargs", "act", "tokens"), CASES[::4])
def test_directional_derivative_is_exact_along_the_output_factor(version, kwargs, act, tokens):
    """y is linear in the last factor (core): the derivative along V is the output with V in its place."""
    rng = np.random.default_rng(zlib.crc32(f"grad{version}{kwargs}{act}{tokens}".encode()))
    cfg = reference_config(version, **kwargs, act=act)
    state = reference_state_dict(version, **kwargs, rng=rng)
    x = rng.normal(size=(5, tokens, cfg["input_dim"]))
    last = f"{'MuMoE2.' if cfg['second_dim'] else 'MuMoE.' if cfg['wrapper'] else ''}factors.{cfg['hierarchy'] + 1}"
    v = rng.normal(size=state[last].shape)
    for training in (True, False):
        y, _ = reference_forward(version, state, x, training=training, act=act)
        cot = rng.normal(size=y.shape)
        d, err = reference_directional_derivative(version, state, x, cotangent=cot, direction={last: v},
                                                  training=training, act=act)
        exact = np.sum(cot * reference_forward(version, {**state, last: v}, x, training=training, act=act)[0])
        assert abs(d - exact) <= 1e-9 * max(1.0, abs(exact)) and err < 1e-8, (d, exact, err)


def test_entmax15_solves_its_threshold_equation():
    rng = np.random.default_rng(1)
    z = rng.normal(scale=3.0, size=(50, 9))
    p = entmax15(z)
    for row, prow in zip(z, p):
        lo, hi = row.max() / 2 - 1.0, row.max() / 2  # sum(clip(z/2 - t)^2) is 1 at some t in [max/2 - 1, max/2]
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if np.sum(np.clip(row / 2 - mid, 0, None) ** 2) > 1 else (lo, mid)
        np.testing.assert_allclose(prow, np.clip(row / 2 - lo, 0, None) ** 2, atol=1e-12)
        assert abs(prow.sum() - 1) < 1e-12


def test_batchnorm_training_uses_batch_statistics_and_updates_running_ones():
    rng = np.random.default_rng(2)
    kwargs = {"input_dim": 4, "output_dim": 3, "expert_dims": [6, 2], "rank": 3, "hierarchy": 2}
    state = reference_state_dict("MMoE.CPMMoE", **kwargs, rng=rng)
    x = rng.normal(size=(7, 4))
    y, stats = reference_forward("MMoE.CPMMoE", state, x, training=True)
    other = {k: (rng.uniform(0.5, 2, size=v.shape) if k.endswith("var") else rng.normal(size=np.shape(v)))
             for k, v in state.items() if k.startswith("bn.") and not k.endswith("tracked")}
    y_other, _ = reference_forward("MMoE.CPMMoE", state, x, training=True, running_stats=other)
    np.testing.assert_allclose(y, y_other, rtol=0, atol=1e-14)  # training ignores the running statistics
    for h in range(2):
        logits = x @ state[f"projs.{h}"]
        m = BN_MOMENTUM
        np.testing.assert_allclose(stats[f"bn.{h}.running_mean"],
                                   (1 - m) * state[f"bn.{h}.running_mean"] + m * logits.mean(0), atol=1e-14)
        np.testing.assert_allclose(stats[f"bn.{h}.running_var"],
                                   (1 - m) * state[f"bn.{h}.running_var"] + m * logits.var(0, ddof=1), atol=1e-14)
        assert stats[f"bn.{h}.num_batches_tracked"] == state[f"bn.{h}.num_batches_tracked"] + 1
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        reference_forward("MMoE.CPMMoE", state, x[:1], training=True)


def test_malformed_state_dicts_are_refused_by_name():
    rng = np.random.default_rng(3)
    kwargs = {"input_dim": 4, "output_dim": 3, "expert_dims": [6], "ranks": [[2, None, 3], [3, None, 2], [2, None, 2]]}
    state = reference_state_dict("MuMoE.TRMuMoE", **kwargs, rng=rng)
    x = rng.normal(size=(3, 4))
    with pytest.raises(KeyError, match="bn.0.running_var"):
        reference_forward("MuMoE.TRMuMoE", {k: v for k, v in state.items() if k != "bn.0.running_var"}, x,
                          training=False)
    with pytest.raises(KeyError, match="extra"):
        reference_forward("MuMoE.TRMuMoE", {**state, "extra": np.zeros(1)}, x, training=False)
    with pytest.raises(ValueError, match="MuMoE.factors.1"):
        reference_forward("MuMoE.TRMuMoE", {**state, "MuMoE.factors.1": np.zeros((3, 7, 2))}, x, training=False)
    with pytest.raises(ValueError, match="hierarchy=2"):
        reference_config("MMoE.CPMMoE", 4, 3, [6], 2, hierarchy=2)
    with pytest.raises(ValueError, match="version"):
        reference_shapes("CPMMoE", 4, 3, [6], 2)


def test_every_version_and_level_is_covered():
    covered = {(v, kw.get("hierarchy", 1)) for v, kw, *_ in (c.values for c in CASES)}
    assert covered == {(v, h) for v in VERSIONS for h in range(1, MAX_HIERARCHY[v] + 1)}


# -- the model against the reference's own modules (where its mirror is present) ----------------


def _reference_modules(tmp_path_factory):
    """{(file, blob, commits): module} for every distinct version of MMoE.py and MuMoE.py."""
    if not REFERENCE_REPO.is_dir():
        pytest.skip(f"the reference repository's mirror is not at {REFERENCE_REPO} (set TENSORMOE_REFERENCE_REPO)")
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    for package in ("torch", "einops", "entmax", "tensorly"):
        pytest.importorskip(package, reason=f"the reference needs {package}")
    import tensorly as tl

    def git(*args):
        return subprocess.run(["git", "-C", str(REFERENCE_REPO), *args], check=True, capture_output=True,
                              text=True, timeout=30).stdout

    root = tmp_path_factory.mktemp("reference")
    modules = {}
    for file in ("MMoE.py", "MuMoE.py"):
        blobs: dict[str, list[str]] = {}
        for commit in git("log", "--all", "--format=%h", "--", file).split():
            try:
                blobs.setdefault(git("rev-parse", f"{commit}:{file}").strip(), []).append(commit)
            except subprocess.CalledProcessError:  # the commit that deleted it
                continue
        for blob, commits in blobs.items():
            path = root / blob[:10] / file
            path.parent.mkdir()
            path.write_text(git("cat-file", "-p", blob))
            spec = importlib.util.spec_from_file_location(f"_reference_{file[:-3]}_{blob[:10]}", path)
            module = importlib.util.module_from_spec(spec)
            backend = tl.get_backend()
            try:
                spec.loader.exec_module(module)
            finally:
                tl.set_backend(backend)  # the reference switches TensorLy to PyTorch on import
            modules[(file, blob[:10], ",".join(sorted(commits)))] = module
    return modules


@pytest.fixture(scope="module")
def reference_modules(tmp_path_factory):
    return _reference_modules(tmp_path_factory)


@pytest.fixture
def float64_default():
    import torch

    previous, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)  # the old MMoE.py appends torch.ones(...) of the default dtype
    torch.set_num_threads(1)  # tiny tensors: threads only add waiting on a busy machine
    try:
        yield torch
    finally:
        torch.set_default_dtype(previous)
        torch.set_num_threads(threads)


def _build(module, version, kwargs, act):
    import torch
    from entmax import entmax15 as package_entmax15

    act_fn = package_entmax15 if act == "entmax15" else (lambda z: torch.softmax(z, dim=-1))
    file_kind, cls = version.split(".")
    if file_kind == "MuMoE":
        return module.MuMoE(MuMoE_layer=getattr(module, cls), act=act_fn, **kwargs)
    return getattr(module, cls)(act=act_fn, **kwargs)


@pytest.mark.parametrize(("version", "kwargs", "act", "tokens"), CASES)
def test_model_equals_reference_module(reference_modules, float64_default, version, kwargs, act, tokens):
    torch = float64_default
    file = version.split(".")[0] + ".py"
    rng = np.random.default_rng(zlib.crc32(f"module{version}{kwargs}{act}{tokens}".encode()))
    cfg = reference_config(version, **kwargs, act=act)
    state = reference_state_dict(version, **kwargs, rng=rng)
    x2, x3 = _inputs(rng, cfg, tokens)
    worst = 0.0
    for (name, _, commits), module in reference_modules.items():
        if name != file:
            continue
        model = _build(module, version, kwargs, act).double()
        # strict: the model's names and shapes are exactly the module's
        model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
        stats = None
        for training, x in ((True, x2), (True, x3), (False, x2), (False, x3)):
            model.train(training)
            with torch.no_grad():
                got = model(torch.as_tensor(x)).numpy()
            want, stats = reference_forward(version, state, x, training=training, running_stats=stats, act=act)
            assert got.shape == want.shape, (commits, training, x.shape)
            diff = float(np.abs(got - want).max())
            worst = max(worst, diff)
            assert diff <= TOL, f"{commits} training={training} x{x.shape}: max |diff| {diff:.3g}"
            buffers = {k: v.numpy() for k, v in model.state_dict().items() if k.startswith("bn.")}
            assert sorted(buffers) == sorted(stats)
            for key, value in stats.items():
                bdiff = float(np.abs(buffers[key] - value).max())
                worst = max(worst, bdiff)
                assert bdiff <= TOL, f"{commits} {key}: max |diff| {bdiff:.3g}"
    print(f"{version} {kwargs} act={act}: max |diff| {worst:.3g}")


@pytest.mark.parametrize(("version", "kwargs", "act", "tokens"), CASES)
def test_directional_derivative_equals_reference_autograd(reference_modules, float64_default, version, kwargs, act,
                                                          tokens):
    """Every gradient of the reference module (parameters and input, train and eval) against the model."""
    torch = float64_default
    file = version.split(".")[0] + ".py"
    rng = np.random.default_rng(zlib.crc32(f"autograd{version}{kwargs}{act}{tokens}".encode()))
    cfg = reference_config(version, **kwargs, act=act)
    state = reference_state_dict(version, **kwargs, rng=rng)
    x = rng.normal(size=(5, tokens, cfg["input_dim"]))
    direction = {k: rng.normal(size=np.shape(v)) for k, v in state.items() if not k.startswith("bn.")}
    direction["x"] = rng.normal(size=x.shape)
    worst = 0.0
    for (name, _, commits), module in reference_modules.items():
        if name != file:
            continue
        model = _build(module, version, kwargs, act).double()
        model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
        for training in (True, False):
            model.train(training)
            model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)  # fresh buffers
            xt = torch.tensor(x, requires_grad=True)
            y = model(xt)
            cot = rng.normal(size=tuple(y.shape))
            model.zero_grad()
            (y * torch.as_tensor(cot)).sum().backward()
            grads = {k: p.grad.numpy() for k, p in model.named_parameters()}
            assert sorted(grads) == sorted(k for k in direction if k != "x")
            dot = sum(float(np.sum(grads[k] * direction[k])) for k in grads)
            dot += float(np.sum(xt.grad.numpy() * direction["x"]))
            scale = sum(float(np.sum(np.abs(grads[k] * direction[k]))) for k in grads)
            d, err = reference_directional_derivative(version, state, x, cotangent=cot, direction=direction,
                                                      training=training, act=act)
            diff = abs(d - dot) / max(1.0, scale)
            worst = max(worst, diff)
            assert err < 1e-9 * max(1.0, scale), f"{commits} training={training}: a kink within the step ({err:.3g})"
            assert diff <= 1e-9, f"{commits} training={training}: relative |diff| {diff:.3g} ({d} vs {dot})"
    print(f"{version} {kwargs} act={act}: gradient relative |diff| {worst:.3g}")
