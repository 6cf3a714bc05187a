"""Portable weights: any backend to any other, identical outputs; bad files fail clearly and change nothing.

The hand-written bad files here each pin one documented message; ``test_file_fuzz.py`` throws
hypothesis-generated ones at every loader under a memory cap.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile

import numpy as np
import pytest
from helpers import BACKENDS, to_numpy

import tensormoe
from tensormoe.tools import io
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
SUFFIX = {"safetensors": ".safetensors", "npz": ".npz"}


def make(kind, backend, **overrides):
    """A layer of ``kind`` in the shape each backend trains with: module, pytree, or functional layer."""
    config = {**CONFIGS[kind], **overrides}
    with tensormoe.backend_context("numpy"):
        core = layer_from_config(config)
        rng = np.random.default_rng(config.get("seed", 0))
        # every parameter random: a file that swapped or transposed two of them would not load equal
        core.params = {k: rng.normal(scale=0.5, size=v.shape).astype("float32") for k, v in core.params.items()}
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


@pytest.mark.parametrize("fmt", sorted(SUFFIX))
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_save_on_any_backend_load_on_any_other_bit_for_bit(tmp_path, kind, fmt):
    for source in BACKENDS:
        layer = make(kind, source)
        path = tmp_path / f"{source}{SUFFIX[fmt]}"
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


def test_the_format_follows_the_suffix_and_can_be_named(tmp_path):
    layer = make("cp", "numpy")
    io.save(layer, tmp_path / "a.npz")
    io.save(layer, tmp_path / "b.safetensors")
    io.save(layer, tmp_path / "c.weights", format="npz")
    io.save(layer, tmp_path / "d.npz", format="safetensors")
    assert zipfile.is_zipfile(tmp_path / "a.npz") and zipfile.is_zipfile(tmp_path / "c.weights")
    assert not zipfile.is_zipfile(tmp_path / "b.safetensors") and not zipfile.is_zipfile(tmp_path / "d.npz")
    for name in "a.npz", "b.safetensors", "c.weights", "d.npz":  # read by content, whatever the name
        assert io.read_config(tmp_path / name) == layer.config()
    with pytest.raises(ValueError, match="format='pickle' is not a weights format"):
        io.save(layer, tmp_path / "e", format="pickle")


def test_safetensors_files_are_plain_safetensors(tmp_path):
    """The ecosystem reads the file with no tensormoe: tensors by name, config JSON in the metadata."""
    import safetensors
    import safetensors.numpy

    layer = make("tucker", "numpy")
    path = tmp_path / "w.safetensors"
    io.save(layer, path)
    arrays = safetensors.numpy.load_file(path)
    assert set(arrays) == {f"params.{k}" for k in layer.params}
    for name, value in layer.params.items():
        np.testing.assert_array_equal(arrays[f"params.{name}"], value)
    with safetensors.safe_open(path, framework="numpy") as f:
        metadata = f.metadata()
    assert metadata["format"] == "tensormoe" and metadata["version"] == "1"
    assert json.loads(metadata["config"]) == layer.config()


@pytest.mark.skipif("pytorch" not in BACKENDS, reason="PyTorch is not installed")
def test_a_saved_module_loads_as_a_plain_state_dict(tmp_path):
    import safetensors.torch
    import torch

    module = make("cp-routed", "pytorch")
    path = tmp_path / "module.safetensors"
    io.save(module, path)
    state = safetensors.torch.load_file(path)
    assert set(state) == set(module.state_dict())
    fresh = make("cp-routed", "pytorch", seed=9)
    fresh.load_state_dict(state)  # strict: every key expected, none missing
    for name, p in module.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], p)
    np.testing.assert_array_equal(to_numpy(fresh(torch.from_numpy(X))), to_numpy(module(torch.from_numpy(X))))


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
    path = tmp_path / "trained.safetensors"
    io.save(module, path)
    expected = forward(module, "pytorch", X)
    for target in BACKENDS:
        served = io.layer_from_file(path, backend=target)
        # same weights, so the outputs agree to float32 rounding of two summation orders
        np.testing.assert_allclose(forward(served, target, X), expected, rtol=2e-6, atol=2e-6, err_msg=target)


@pytest.mark.skipif("pytorch" not in BACKENDS, reason="PyTorch is not installed")
@pytest.mark.parametrize("fmt", sorted(SUFFIX))
def test_bfloat16_and_float16_round_trip_exactly(tmp_path, fmt):
    import safetensors.torch
    import torch

    from tensormoe.torch import CPMMoE

    for dtype, convert in [("bfloat16", CPMMoE.bfloat16), ("float16", CPMMoE.half)]:
        module = convert(CPMMoE(6, 5, [4], rank=3))
        path = tmp_path / f"{dtype}{SUFFIX[fmt]}"
        io.save(module, path)
        assert io.read_config(path)["dtype"] == dtype
        if fmt == "safetensors":  # stored in its own dtype, half the bytes of float32
            assert all(t.dtype == getattr(torch, dtype) for t in safetensors.torch.load_file(path).values())
        rebuilt = tensormoe.torch.wrap(io.layer_from_file(path, backend="pytorch"))
        assert all(p.dtype == getattr(torch, dtype) for p in rebuilt.parameters())
        for name, p in module.params.items():
            assert torch.equal(rebuilt.params[name], p)
        numpy_layer = io.layer_from_file(path, backend="numpy")
        expected_dtype = "float32" if dtype == "bfloat16" else dtype  # NumPy has no bfloat16
        assert numpy_layer.dtype == expected_dtype
        for name, p in module.params.items():
            np.testing.assert_array_equal(numpy_layer.params[name].astype("float32"), p.detach().float().numpy())


@pytest.mark.skipif("jax" not in BACKENDS, reason="JAX is not installed")
def test_bfloat16_from_jax_is_stored_as_bfloat16(tmp_path):
    import safetensors

    import tensormoe.jax as tmj

    layer = tmj.TRMMoE(6, 5, [4], ranks=2, dtype="bfloat16")
    path = tmp_path / "jax.safetensors"
    io.save(layer, path)
    with safetensors.safe_open(path, framework="numpy") as f:  # the raw header: dtype BF16, 2 bytes a value
        assert all(f.get_slice(name).get_dtype() == "BF16" for name in f.keys())
    for target in BACKENDS:
        rebuilt = io.layer_from_file(path, backend=target)
        assert rebuilt.dtype == ("float32" if target == "numpy" else "bfloat16")
        for name, value in layer.params.items():
            np.testing.assert_array_equal(to_numpy(rebuilt.params[name]), to_numpy(value))


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


def rewrite(path, out, replace=None, add=None, drop=(), compression=zipfile.ZIP_STORED):
    """Copy the archive at ``path`` to ``out``, replacing, adding or dropping entries."""
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w", compression=compression) as dst:
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


def npy_claim(shape, descr="<f4", data=b""):
    """A .npy header claiming ``shape`` followed by ``data`` (usually far fewer bytes than claimed)."""
    import io as _io

    buffer = _io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + data


def header_bytes(header):
    return npy_bytes(np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))


def zip_bomb(path, out, member, claimed_shape):
    """An archive whose ``member`` claims ``claimed_shape`` and really holds it: zeros, deflated to a few KiB."""
    count = int(np.prod(claimed_shape))
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if item.filename != member:
                dst.writestr(item.filename, src.read(item.filename))
        with dst.open(member, "w", force_zip64=True) as entry:
            entry.write(npy_claim(claimed_shape))
            zeros = bytes(1 << 20)
            for _ in range(count * 4 // len(zeros)):
                entry.write(zeros)
    return out


def bad_npz_files(saved, tmp_path):
    """(name -> path, expected message fragment) for every kind of bad .npz file."""
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
        "flipped byte": (bytes(corrupted), "Bad CRC-32"),
        "empty": (b"", "it has 0 bytes"),
        "a pickle": (pickle.dumps({"factor_0": _Payload(marker)}), "it is not a safetensors file or .npz archive"),
        "plain npy": (npy_bytes(np.zeros(3)), "it is not a safetensors file or .npz archive"),
    }
    out = {name: (tmp_path / f"{k}.bin", msg) for k, (name, (data, msg)) in enumerate(files.items())}
    for name, (data, _) in files.items():
        out[name][0].write_bytes(data)
    obj = np.array([_Payload(marker)], dtype=object)
    config = header["config"]
    header_other = {**header, "config": {**config, "class": "TTMMoE", "ranks": 3}}
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
                                ("class='TTMMoE' (the layer has 'CPMMoE')", None)),
        "other gate": ({"__tensormoe__.npy": header_bytes({**header, "config": {**config, "gate": "softmax"}})},
                       None, (), ("gate='softmax' (the layer has 'entmax15')", None)),
        "wrong shape": ({"factor_0.npy": npy_bytes(np.zeros((4, 2), dtype="float32"))}, None, (),
                        ("parameter 'factor_0' has shape (4, 2); the layer expects (4, 3)",
                         "does not build a layer of the 95 parameters it stores")),
        "integer weights": ({"factor_0.npy": npy_bytes(np.zeros((4, 3), dtype="int64"))}, None, (),
                            "has dtype int64"),
        "truncated entry header": ({"factor_0.npy": npy_bytes(np.zeros((4, 3), dtype="float32"))[:80]}, None, (),
                                   "entry 'factor_0.npy' is not a valid .npy array"),
        "truncated entry data": ({"factor_0.npy": npy_bytes(np.zeros((4, 3), dtype="float32"))[:150]}, None, (),
                                 "(176 bytes with its header) but the archive declares 150 bytes"),
        # a header claiming a huge array inside a small entry: refused before anything is allocated
        "oversized claim": ({"factor_0.npy": npy_claim((4000000, 3000000), data=bytes(48))}, None, (),
                            "claims shape (4000000, 3000000)"),
        # int64 products wrap to 0 here; Python integers do not
        "wrapping claim": ({"factor_0.npy": npy_claim((2**32, 2**32))}, None, (), "claims shape (4294967296, "),
        "header says float64, array is float32": (
            {"__tensormoe__.npy": header_bytes({**header, "dtypes": {**header["dtypes"], "factor_0": "float64"}})},
            None, (), "parameter 'factor_0' is stored as float32; its header says float64"),
        "config says float64": (
            {"__tensormoe__.npy": header_bytes({**header, "config": {**config, "dtype": "float64"}})},
            None, (), "its configuration says dtype='float64'"),
        # a 2 KiB file whose configuration asks for a huge layer: refused before anything is drawn
        "huge expert_dims": ({"__tensormoe__.npy": header_bytes({**header, "config": {**config,
                                                                                     "expert_dims": [10**9, 3]}})},
                             None, (), (ANOTHER + "expert_dims=[1000000000, 3]", BUILD)),
        "huge rank": ({"__tensormoe__.npy": header_bytes({**header, "config": {**config, "rank": 10**8}})},
                      None, (), (ANOTHER + "rank=100000000", BUILD)),
    }
    for k, (name, (replace, add, drop, msg)) in enumerate(variants.items()):
        out[name] = (rewrite(saved, tmp_path / f"v{k}.npz", replace, add, drop), msg)
    # a zip directory of 10,000 entries (1.1 MB): refused before zipfile makes an object for each
    many = tmp_path / "many.npz"
    with zipfile.ZipFile(many, "w") as archive:
        for k in range(10000):
            archive.writestr(f"{k:060d}.npy", b"")
    out["huge directory"] = (many, "its zip directory lists 10,000 entries in 1,100,000 bytes")
    # 40 MiB of zeros in a ~40 KiB entry: refused from the zip's declared size, before decompressing
    out["zip bomb"] = (zip_bomb(saved, tmp_path / "bomb.npz", "factor_0.npy", (4, 3 * 2**20)),
                       "parameter 'factor_0' has shape (4, 3145728); the layer expects (4, 3)")
    return out, marker


def safetensors_bytes(header, data):
    """A safetensors file written by hand (the format is an 8-byte length, JSON, then the bytes)."""
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def bad_safetensors_files(tmp_path):
    """(name -> path, expected message fragment) for every kind of bad safetensors file."""
    good = tmp_path / "good.safetensors"
    io.save(make("cp", "numpy", seed=1), good)
    raw = good.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8: 8 + length]), raw[8 + length:]
    meta = header["__metadata__"]
    config = json.loads(meta["config"])

    def with_config(**changes):
        return {**header, "__metadata__": {**meta, "config": json.dumps({**config, **changes})}}

    def with_tensor(name, **changes):
        return {**header, name: {**header[name], **changes}}

    begin, end = header["params.factor_0"]["data_offsets"]
    cases = {
        "truncated": (raw[: len(raw) - 7], "truncated"),
        "header length beyond the file": (raw[:8] + raw[8:40], "truncated"),
        "huge header length": ((2**62).to_bytes(8, "little") + raw[8:], "claim a 4,611,686,018,427,387,904-byte"),
        "not JSON": (safetensors_bytes({}, b"")[:8] + b"{" * 8, "header is not valid JSON"),
        "deeply nested JSON": (len(b"[" * 200000).to_bytes(8, "little") + b"[" * 200000, "not valid JSON"),
        "a list": (safetensors_bytes([1, 2], b""), "its header is a JSON list"),
        "no metadata": (safetensors_bytes({k: v for k, v in header.items() if k != "__metadata__"}, data),
                        "does not name the format 'tensormoe'"),
        "future version": (safetensors_bytes({**header, "__metadata__": {**meta, "version": "2"}}, data),
                           "format version '2'"),
        "bad config": (safetensors_bytes({**header, "__metadata__": {**meta, "config": "{oops"}}, data),
                       "config is not valid JSON"),
        "unknown class": (safetensors_bytes(with_config(**{"class": "os.system"}), data),
                          (ANOTHER + "class='os.system'", "class 'os.system'")),
        "max_bytes smuggled in": (safetensors_bytes(with_config(max_bytes=2**60), data), (None, "the key 'max_bytes'")),
        "huge claimed shape": (safetensors_bytes(with_tensor("params.factor_0", shape=[10**9, 3]), data),
                               "claims shape (1000000000, 3) of float32 (12,000,000,000 bytes) but spans 48 bytes"),
        "wrapping claimed shape": (safetensors_bytes(with_tensor("params.factor_0", shape=[2**32, 2**32]), data),
                                   "claims shape (4294967296, 4294967296)"),
        "negative shape": (safetensors_bytes(with_tensor("params.factor_0", shape=[-4, -3]), data),
                           "expected a list of non-negative integers"),
        "offsets past the end": (safetensors_bytes(with_tensor("params.factor_0", data_offsets=[begin + 10**9,
                                                                                           end + 10**9]), data),
                                 "tensors must tile the data"),
        "overlapping tensors": (safetensors_bytes(with_tensor("params.factor_1", data_offsets=[
            header["params.factor_1"]["data_offsets"][0] - 4, header["params.factor_1"]["data_offsets"][1] - 4]), data),
                                "tensors must tile the data"),
        "integer dtype": (safetensors_bytes(with_tensor("params.factor_0", dtype="I32"), data),
                          "has dtype 'I32'; expected one of ['BF16', 'F16', 'F32', 'F64']"),
        "stored float16, config float32": (
            safetensors_bytes(with_tensor("params.factor_0", dtype="F16", data_offsets=[begin, begin + 24]),
                              data[:begin] + data[begin: begin + 24]), "tensors must tile the data"),
        "header says float64, array is float32": (
            safetensors_bytes(with_config(dtype="float64"), data),
            "parameter 'factor_0' is stored as float32; its configuration says dtype='float64'"),
        "unexpected tensor": (safetensors_bytes({**header, "params.evil": {"dtype": "F32", "shape": [1],
                                                                          "data_offsets": [len(data), len(data) + 4]}},
                                                data + bytes(4)), "(unexpected ['evil'])"),
        "foreign name": (safetensors_bytes({**header, "weight": {"dtype": "F32", "shape": [1],
                                                                 "data_offsets": [len(data), len(data) + 4]}},
                                           data + bytes(4)), "it holds a tensor named 'weight'"),
        "missing tensor": (safetensors_bytes({**{k: v for k, v in header.items() if k != "params.gate_1"}},
                                             data[: header["params.gate_1"]["data_offsets"][0]]
                                             + data[header["params.gate_1"]["data_offsets"][1]:]),
                           ("(missing ['gate_1'])", "of the 81 parameters it stores")),
        "huge expert_dims": (safetensors_bytes(with_config(expert_dims=[10**9, 3]), data),
                             (ANOTHER + "expert_dims=[1000000000, 3]", BUILD)),
        "huge rank": (safetensors_bytes(with_config(rank=10**8), data), (ANOTHER + "rank=100000000", BUILD)),
        "other layer": (safetensors_bytes(with_config(rank=2), data), ("rank=2 (the layer has 3)", None)),
    }
    out = {}
    for k, (name, (content, message)) in enumerate(cases.items()):
        out[name] = (tmp_path / f"s{k}.safetensors", message)
        out[name][0].write_bytes(content)
    return out


def check_refused(files):
    """Every loader refuses every file with a ValueError naming it and the problem; the targets stay unchanged.

    ``files`` maps a case to ``(path, message)``: the fragment every loader's message holds, or a pair of
    fragments ``(load's, layer_from_file's)`` where they differ, ``None`` for a loader that rightly accepts
    the file (a valid file of another layer builds that layer; ``load`` ignores keys it does not compare).
    """
    targets = {name: make("cp", name, seed=5) for name in BACKENDS}
    before = {name: snapshot(layer) for name, layer in targets.items()}
    for case, (path, message) in files.items():
        for_load, for_build = message if isinstance(message, tuple) else (message, message)
        loaders = [(name, lambda p, layer=layer: io.load(layer, p), for_load) for name, layer in targets.items()]
        loaders += [("layer_from_file", io.layer_from_file, for_build), ("read_config", io.read_config, for_load)]
        for name, loader, fragment in loaders:
            if fragment is None or (name == "read_config" and case in CONFIG_PROBLEMS):
                continue
            with pytest.raises(ValueError, match="cannot load tensormoe weights from") as err:
                loader(path)
                pytest.fail(f"{case}: {name} loaded without an error")
            assert fragment in str(err.value), (case, name, str(err.value))
            assert str(path) in str(err.value)
            assert "\n" not in str(err.value)
        for name, layer in targets.items():
            after = snapshot(layer)
            assert all(np.array_equal(after[k], before[name][k]) for k in after), (case, name)


#: files whose header is sound but whose configuration or shapes do not fit the layer: read_config reads them
CONFIG_PROBLEMS = {
    "other factorization", "other gate", "other layer", "wrong shape", "zip bomb", "huge expert_dims", "huge rank",
    "unknown class", "max_bytes smuggled in", "unexpected tensor", "missing tensor",
}
ANOTHER = "it holds another layer: "
BUILD = "its configuration does not build a layer of the 99 parameters it stores"


WASTEFUL = "ignore::tensormoe.factorizations.OverparameterizedWarning"  # rank=10**8 warns, then is refused


@pytest.mark.filterwarnings(WASTEFUL)
def test_bad_npz_files_raise_clear_errors_and_change_nothing(saved, tmp_path):
    files, marker = bad_npz_files(saved, tmp_path)
    check_refused(files)
    assert not os.path.exists(marker), "loading a file executed code from it"


@pytest.mark.filterwarnings(WASTEFUL)
def test_bad_safetensors_files_raise_clear_errors_and_change_nothing(tmp_path):
    check_refused(bad_safetensors_files(tmp_path))


@pytest.mark.parametrize("fmt", sorted(SUFFIX))
def test_the_memory_limit_refuses_a_file_before_reading_it(tmp_path, monkeypatch, fmt):
    path = tmp_path / f"w{SUFFIX[fmt]}"
    layer = make("cp", "numpy")
    io.save(layer, path)
    nbytes = sum(v.nbytes for v in layer.params.values())
    for loader in (io.read_config, lambda p, **kw: io.load(make("cp", "numpy"), p, **kw), io.layer_from_file):
        with pytest.raises(ValueError, match=rf"its tensors: 99 parameters, {nbytes} bytes .* the limit max_bytes=100"):
            loader(path, max_bytes=100)
        assert loader(path, max_bytes=nbytes) is not None
        monkeypatch.setenv("TENSORMOE_MAX_BYTES", "0.1 KiB")
        with pytest.raises(ValueError, match=r"expected at most 102 bytes .* TENSORMOE_MAX_BYTES='0.1 KiB'"):
            loader(path)
        monkeypatch.delenv("TENSORMOE_MAX_BYTES")


def test_wrong_dims_and_missing_file(tmp_path):
    path = tmp_path / "w.safetensors"
    io.save(make("cp", "numpy", seed=1), path)
    layer = make("cp", "numpy", expert_dims=[4, 2])
    with pytest.raises(ValueError, match=r"expert_dims=\[4, 3\] \(the layer has \[4, 2\]\)"):
        io.load(layer, path)
    with pytest.raises(FileNotFoundError):
        io.load(layer, tmp_path / "absent.safetensors")
    with pytest.raises(TypeError, match="layer must be a tensormoe layer"):
        io.save({"factor_0": np.zeros(2)}, tmp_path / "x.safetensors")


@pytest.mark.parametrize("fmt", sorted(SUFFIX))
def test_save_is_atomic(tmp_path, monkeypatch, fmt):
    """An interrupted save leaves the previous file intact and no temporary file behind."""
    import safetensors.numpy

    path = tmp_path / f"w{SUFFIX[fmt]}"
    io.save(make("tt", "numpy", seed=1), path)
    good = path.read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", boom)
    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        io.save(make("tt", "numpy", seed=2), path)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == [path.name]


def test_a_layer_with_router_objects_is_refused_and_routers_must_match(tmp_path):
    from tensormoe.routers import TopKRouter

    layer = tensormoe.CPMMoE(6, 5, [4], rank=2, router=TopKRouter(k=2, noise=None))
    with pytest.raises(ValueError, match="config\\(\\) describes routers by name only"):
        io.save(layer, tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors").exists()
    other = tmp_path / "routed.safetensors"
    io.save(make("cp-routed", "numpy"), other)
    with pytest.raises(ValueError, match=r"router=\['top2', 'softmax'\] \(the layer has None\)"):
        io.load(make("cp", "numpy"), other)
