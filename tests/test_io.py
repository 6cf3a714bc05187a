"""Portable weights: any backend to any other, identical outputs; bad files fail clearly and change nothing."""

from __future__ import annotations

import json
import os
import pickle
import zipfile

import numpy as np
import pytest
from helpers import BACKENDS, to_numpy

import tensormoe
from tensormoe import io
from tensormoe.layer import layer_from_config
from tensormoe.ops import get_ops

CONFIGS = {
    "cp": {"class": "CPMMoE", "in_dim": 6, "out_dim": 5, "expert_dims": [4, 3], "rank": 3},
    "tucker": {"class": "TuckerMMoE", "in_dim": 6, "out_dim": 5, "expert_dims": [4], "ranks": [2, 3, 4]},
    "tt": {"class": "TTMMoE", "in_dim": 6, "out_dim": 5, "expert_dims": [4, 2, 2], "ranks": 2},
    "tr": {"class": "TRMMoE", "in_dim": 6, "out_dim": 5, "expert_dims": [4], "ranks": [2, 3, 2], "bias": False},
    # routers with their own parameters (top-k noise weights) travel too
    "cp-routed": {"class": "CPMMoE", "in_dim": 6, "out_dim": 5, "expert_dims": [4, 3], "rank": 3,
                  "router": ["top2", "softmax"]},
}


def make(kind, backend, **overrides):
    """A layer of ``kind`` in the shape each backend trains with: module, pytree, or functional layer."""
    config = {**CONFIGS[kind], **overrides}
    with tensormoe.backend_context("numpy"):
        core = layer_from_config(config)
        rng = np.random.default_rng(config.get("seed", 0))
        core.params = {k: (rng.normal(size=v.shape).astype("float32") if k.startswith("gate_") else v)
                       for k, v in core.params.items()}
    if backend == "pytorch":
        from tensormoe.torch import wrap

        return wrap(core)
    if backend == "jax":
        from tensormoe.jax import wrap

        return wrap(core)
    return core


def params_numpy(layer):
    return {k: to_numpy(v) for k, v in dict(layer.params.items()).items()}


def forward(layer, backend, x):
    """The layer's output on its own backend, as NumPy."""
    ops = get_ops(backend)
    if isinstance(layer, tensormoe.MMoE):
        with tensormoe.backend_context(backend):
            return to_numpy(layer(ops.asarray(x, "float32")))
    return to_numpy(layer(ops.asarray(x, "float32")))


X = np.random.default_rng(0).normal(size=(7, 6)).astype("float32")


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_save_on_any_backend_load_on_any_other_bit_for_bit(tmp_path, kind):
    for source in BACKENDS:
        layer = make(kind, source)
        path = tmp_path / f"{source}.npz"
        io.save(layer, path)
        expected = params_numpy(layer)
        for target in BACKENDS:
            rebuilt = io.layer_from_file(path, backend=target)  # from the file alone
            assert rebuilt.config() == layer.config()
            loaded = io.load(make(kind, target, seed=3), path)  # into an existing layer (another seed)
            for got in (params_numpy(rebuilt), params_numpy(loaded)):
                assert set(got) == set(expected)
                for name, value in expected.items():
                    np.testing.assert_array_equal(got[name], value, err_msg=f"{source} -> {target}: {name}")


@pytest.mark.skipif("pytorch" not in BACKENDS, reason="PyTorch is not installed")
@pytest.mark.parametrize("kind", ["cp", "tt", "cp-routed"])
def test_trained_in_pytorch_serves_in_numpy_and_jax(tmp_path, kind):
    import torch

    module = make(kind, "pytorch")
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    x = torch.from_numpy(X)
    for _ in range(3):  # move the weights away from their initial values
        optimizer.zero_grad()
        (module(x) ** 2).mean().backward()
        optimizer.step()
    path = tmp_path / "trained.npz"
    io.save(module, path)
    expected = forward(module, "pytorch", X)
    for target in BACKENDS:
        served = io.layer_from_file(path, backend=target)
        # same weights, so the outputs agree to float32 rounding of two summation orders
        np.testing.assert_allclose(forward(served, target, X), expected, rtol=2e-6, atol=2e-6, err_msg=target)


@pytest.mark.skipif("pytorch" not in BACKENDS, reason="PyTorch is not installed")
def test_bfloat16_and_float16_round_trip_exactly(tmp_path):
    import torch

    from tensormoe.torch import CPMMoE

    for dtype, convert in [("bfloat16", CPMMoE.bfloat16), ("float16", CPMMoE.half)]:
        module = convert(CPMMoE(6, 5, [4], rank=3))
        path = tmp_path / f"{dtype}.npz"
        io.save(module, path)
        assert io.read_config(path)["dtype"] == dtype
        rebuilt = tensormoe.torch.wrap(io.layer_from_file(path, backend="pytorch"))
        assert all(p.dtype == getattr(torch, dtype) for p in rebuilt.parameters())
        for name, p in module.params.items():
            assert torch.equal(rebuilt.params[name], p)
        numpy_layer = io.layer_from_file(path, backend="numpy")
        expected_dtype = "float32" if dtype == "bfloat16" else dtype  # NumPy has no bfloat16
        assert numpy_layer.dtype == expected_dtype
        for name, p in module.params.items():
            np.testing.assert_array_equal(numpy_layer.params[name].astype("float32"), p.detach().float().numpy())


# --- bad files: a clear ValueError, no code run, nothing changed --------------------------------


def snapshot(layer):
    return {k: v.copy() for k, v in params_numpy(layer).items()}


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "w.npz"
    io.save(make("cp", "numpy", seed=1), path)
    return path


class _Payload:
    """Unpickling this would create a directory: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def rewrite(path, out, replace=None, add=None, drop=()):
    """Copy the archive at ``path`` to ``out``, replacing, adding or dropping entries."""
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            if item.filename in drop:
                continue
            data = (replace or {}).get(item.filename, src.read(item.filename))
            dst.writestr(item.filename, data)
        for name, data in (add or {}).items():
            dst.writestr(name, data)
    return out


def npy_bytes(array, allow_pickle=False):
    import io as _io

    buffer = _io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def header_bytes(header):
    return npy_bytes(np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))


def bad_files(saved, tmp_path):
    """(name, path, expected message fragment) for every kind of bad file."""
    marker = str(tmp_path / "code-ran")
    raw = saved.read_bytes()
    with zipfile.ZipFile(saved) as archive:
        header = json.loads(np.lib.format.read_array(archive.open("__tensormoe__.npy")).tobytes())
        info = archive.getinfo("factor_1.npy")
    # the last byte of factor_1's data: after the 30-byte local header, the name and the extra field
    extra = int.from_bytes(raw[info.header_offset + 28: info.header_offset + 30], "little")
    offset = info.header_offset + 30 + len(info.filename) + extra + info.compress_size - 1
    corrupted = bytearray(raw)
    corrupted[offset] ^= 0xFF
    files = {
        "truncated": (raw[: len(raw) // 2], "not an intact .npz archive"),
        "flipped byte": (bytes(corrupted), "not an intact .npz archive"),
        "empty": (b"", "not an intact .npz archive"),
        "a pickle": (pickle.dumps({"factor_0": _Payload(marker)}), "not an intact .npz archive"),
        "plain npy": (npy_bytes(np.zeros(3)), "not an intact .npz archive"),
    }
    out = {name: (tmp_path / f"{k}.bin", msg) for k, (name, (data, msg)) in enumerate(files.items())}
    for name, (data, _) in files.items():
        out[name][0].write_bytes(data)
    obj = np.array([_Payload(marker)], dtype=object)
    header_other = {**header, "config": {**header["config"], "class": "TTMMoE", "ranks": 3}}
    del header_other["config"]["rank"]
    variants = {
        "pickled entry": ({"factor_0.npy": npy_bytes(obj, allow_pickle=True)}, None, (), "pickled (object) data"),
        "extra pickle": (None, {"evil.npy": npy_bytes(obj, allow_pickle=True)}, (), "unexpected entries ['evil.npy']"),
        "no header": (None, None, ("__tensormoe__.npy",), "has no '__tensormoe__' entry"),
        "missing parameter": (None, None, ("gate_1.npy",), "lacks the parameters ['gate_1']"),
        "bad json": ({"__tensormoe__.npy": npy_bytes(np.frombuffer(b"{not json", dtype=np.uint8))}, None, (),
                     "header is not valid JSON"),
        "future version": ({"__tensormoe__.npy": header_bytes({**header, "version": 99})}, None, (),
                           "format version 99"),
        "other factorization": ({"__tensormoe__.npy": header_bytes(header_other)}, None, (),
                                "class='TTMMoE' (the layer has 'CPMMoE')"),
        "other gate": ({"__tensormoe__.npy": header_bytes({**header, "config": {**header["config"],
                                                                               "gate": "softmax"}})},
                       None, (), "gate='softmax' (the layer has 'entmax15')"),
        "wrong shape": ({"factor_0.npy": npy_bytes(np.zeros((4, 2), dtype="float32"))}, None, (),
                        "parameter 'factor_0' has shape (4, 2); the layer expects (4, 3)"),
        "integer weights": ({"factor_0.npy": npy_bytes(np.zeros((4, 3), dtype="int64"))}, None, (),
                            "has dtype int64"),
        "truncated entry": ({"factor_0.npy": npy_bytes(np.zeros((4, 3), dtype="float32"))[:80]}, None, (),
                            "not a valid .npy array"),
        # a header claiming a huge array inside a small entry: refused before anything is allocated
        "oversized claim": ({"factor_0.npy": huge_claim()}, None, (), "claims shape (4000000, 3000000)"),
    }
    for k, (name, (replace, add, drop, msg)) in enumerate(variants.items()):
        out[name] = (rewrite(saved, tmp_path / f"v{k}.npz", replace, add, drop), msg)
    return out, marker


def huge_claim():
    import io as _io

    buffer = _io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": (4000000, 3000000)})
    return buffer.getvalue() + bytes(48)


def test_bad_files_raise_clear_errors_and_change_nothing(saved, tmp_path):
    files, marker = bad_files(saved, tmp_path)
    targets = {name: make("cp", name, seed=5) for name in BACKENDS}
    before = {name: snapshot(layer) for name, layer in targets.items()}
    for case, (path, message) in files.items():
        for name, layer in targets.items():
            with pytest.raises(ValueError, match="cannot load tensormoe weights from") as err:
                io.load(layer, path)
                pytest.fail(f"{case}: loaded without an error")
            assert message in str(err.value), (case, str(err.value))
            assert str(path) in str(err.value)
            after = snapshot(layer)
            assert all(np.array_equal(after[k], before[name][k]) for k in after), (case, name)
        if case not in ("other factorization", "other gate"):  # those are valid files of another layer
            with pytest.raises(ValueError, match="cannot load tensormoe weights from"):
                io.layer_from_file(path)
    assert not os.path.exists(marker), "loading a file executed code from it"


def test_wrong_dims_and_missing_file(saved, tmp_path):
    layer = make("cp", "numpy", expert_dims=[4, 2])
    with pytest.raises(ValueError, match=r"expert_dims=\[4, 3\] \(the layer has \[4, 2\]\)"):
        io.load(layer, saved)
    with pytest.raises(FileNotFoundError):
        io.load(layer, tmp_path / "absent.npz")
    with pytest.raises(TypeError, match="layer must be a tensormoe layer"):
        io.save({"factor_0": np.zeros(2)}, tmp_path / "x.npz")


def test_save_is_atomic(tmp_path, monkeypatch):
    """An interrupted save leaves the previous file intact and no temporary file behind."""
    path = tmp_path / "w.npz"
    io.save(make("tt", "numpy", seed=1), path)
    good = path.read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(KeyboardInterrupt):
        io.save(make("tt", "numpy", seed=2), path)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["w.npz"]


def test_a_layer_with_router_objects_is_refused_and_routers_must_match(tmp_path):
    from tensormoe.routers import TopKRouter

    layer = tensormoe.CPMMoE(6, 5, [4], rank=2, router=TopKRouter(k=2, noise=None))
    with pytest.raises(ValueError, match="config\\(\\) describes routers by name only"):
        io.save(layer, tmp_path / "w.npz")
    assert not (tmp_path / "w.npz").exists()
    other = tmp_path / "routed.npz"
    io.save(make("cp-routed", "numpy"), other)
    with pytest.raises(ValueError, match=r"router=\['top2', 'softmax'\] \(the layer has None\)"):
        io.load(make("cp", "numpy"), other)
