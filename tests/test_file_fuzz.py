"""Hostile weights files through every loader: a ValueError, within a memory cap and in bounded time, target unchanged.

One subprocess (this file run as a script) builds a numpy layer, a torch module and a JAX layer, loads a
valid file once into each (so that every framework has done its lazy allocations), then caps its own
address space with ``resource.setrlimit(RLIMIT_AS)`` at what it uses plus :data:`HEADROOM`, and runs:

* the issue's hostile inputs (:func:`issue_cases`): 2 KiB files whose configuration asks for a huge layer,
  a 2.4 MB zip holding 512 MiB of zeros, shapes whose int64 product wraps around, a float32 array in a
  float64 file, and the constructor calls that used to fail with a bare ``MemoryError``;
* hypothesis-generated files (:func:`hostile_files`): safetensors and ``.npz`` files with corrupted,
  truncated, oversized, mismatched or hostile headers and entries (huge claimed shapes, zip bombs, pickles,
  wrong dtypes, offsets past the end, foreign names, configurations of huge layers), random bytes and
  random byte flips.

Every file goes through ``io.load`` (into the numpy, torch and JAX targets), ``io.layer_from_file`` and
``io.read_config``.  Each call either raises ``ValueError`` naming the file, or succeeds with exactly the
values an independent reader (``safetensors.numpy``, ``numpy.load``) finds in the file; files whose
corruption no reader may accept (``must_fail``) must raise.  Any other exception, ``MemoryError`` first,
fails; a target that changed after a refused load fails.  The child prints a JSON summary (counts, peak
memory, slowest call) that the test checks and the robustness guide quotes.
"""

from __future__ import annotations

import dataclasses
import io as _io
import json
import math
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and resource limits")
#: address space the child may use beyond what it holds after its warm-up
HEADROOM = 256 * 2**20
#: size of the zip bomb's entry (decompressed), twice the headroom
BOMB_BYTES = 512 * 2**20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: slowest single loader call accepted (seconds; the cases are small, so this only catches runaway work)
SLOWEST_CALL = 10.0


def test_hostile_files_under_a_memory_cap(tmp_path):
    from hypothesis import settings

    examples = 15 * settings.default.max_examples  # 300 with the "ci" profile, 3000 with "dev"
    # few malloc arenas: each new thread's arena would reserve 64 MiB of the capped address space
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(tmp_path), str(examples)],
        capture_output=True, text=True, timeout=540, env=env, check=False,
    )
    tail = (proc.stdout[-4000:] + "\n" + proc.stderr[-6000:]).strip()
    assert proc.returncode == 0, tail
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(summary, indent=1))
    assert summary["examples"] >= examples and summary["calls"] >= 5 * examples
    assert summary["issue_cases"] and all(c["error"] == "ValueError" for c in summary["issue_cases"]), summary
    assert summary["rss_growth_bytes"] < HEADROOM, summary
    assert summary["slowest_call_s"] < SLOWEST_CALL, summary


# ==================================================================================================
# the child: everything below runs in the capped subprocess
# ==================================================================================================

CONFIG = {"class": "CPMMoE", "in_dim": 6, "out_dim": 5, "expert_dims": [4, 3], "rank": 3}


@dataclasses.dataclass
class Case:
    kind: str
    content: bytes | None = None
    write: object = None  # a function writing the file (zip bombs are streamed, never held in memory)
    must_fail: bool = True  # io.load and io.layer_from_file must raise
    header_ok: bool = False  # the header is sound (only the configuration or shapes are wrong): read_config may read it


def _st_bytes(header, data):
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def _st_parse(raw):
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8: 8 + length]), raw[8 + length:]


def _npy(shape, descr="<f4", data=b"", fortran=False):
    buffer = _io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": fortran, "shape": shape})
    return buffer.getvalue() + data


def _zip(entries, compression=zipfile.ZIP_STORED):
    buffer = _io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


def _bomb_writer(entries, member, shape, nbytes):
    """Write an archive whose ``member`` claims ``shape`` and holds ``nbytes`` of real zeros, deflated."""

    def write(path):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
                for name, data in entries.items():
                    if name != member:
                        archive.writestr(name, data)
                with archive.open(member, "w", force_zip64=True) as entry:
                    entry.write(_npy(shape))
                    chunk, left = bytes(4 * 2**20), nbytes
                    while left > 0:
                        entry.write(chunk[: min(left, len(chunk))])
                        left -= len(chunk)

    return write


class Child:
    """The targets, the base files and the bookkeeping of one capped run."""

    def __init__(self, folder):
        import tensormoe
        from tensormoe.tools import io
        from tensormoe.layer import layer_from_config

        self.folder, self.io = folder, io
        self.backends = tensormoe.available_backends()
        with tensormoe.backend_context("numpy"):
            source = layer_from_config(CONFIG)
            rng = np.random.default_rng(0)
            source.params = {k: rng.normal(size=v.shape).astype("float32") for k, v in source.params.items()}
            other = layer_from_config({**CONFIG, "rank": 2})
        self.st_path, self.npz_path = os.path.join(folder, "base.safetensors"), os.path.join(folder, "base.npz")
        io.save(source, self.st_path)
        io.save(source, self.npz_path)
        self.st_raw, self.npz_raw = pathlib.Path(self.st_path).read_bytes(), pathlib.Path(self.npz_path).read_bytes()
        self.st_header, self.st_data = _st_parse(self.st_raw)
        with zipfile.ZipFile(self.npz_path) as archive:
            self.npz_entries = {name: archive.read(name) for name in archive.namelist()}
        self.shapes = {name + ".npy": value.shape for name, value in source.params.items()}
        self.npz_header = json.loads(np.lib.format.read_array(_io.BytesIO(self.npz_entries["__tensormoe__.npy"])).tobytes())
        other_st, other_npz = os.path.join(folder, "other.safetensors"), os.path.join(folder, "other.npz")
        io.save(other, other_st)
        io.save(other, other_npz)
        self.others = [pathlib.Path(other_st).read_bytes(), pathlib.Path(other_npz).read_bytes()]
        self.targets = {}
        for backend in self.backends:
            with tensormoe.backend_context("numpy"):
                core = layer_from_config({**CONFIG, "seed": 5})
            if backend == "pytorch":
                from tensormoe.torch import wrap
            elif backend == "jax":
                from tensormoe.jax import wrap
            else:
                def wrap(layer):
                    return layer
            self.targets[backend] = wrap(core)
        for target in self.targets.values():  # warm-up: every framework allocates what it needs once
            io.load(target, self.st_path)
            io.load(target, self.npz_path)
            io.layer_from_file(self.st_path)
        self.snapshots = {name: self.snapshot(t) for name, t in self.targets.items()}
        self.calls = self.examples = self.accepted = 0
        self.kinds, self.slowest = {}, 0.0

    @staticmethod
    def snapshot(layer):
        from tensormoe.ops import get_ops, ops_for_array

        return {k: get_ops(ops_for_array(v)).to_numpy(v).copy() for k, v in dict(layer.params.items()).items()}

    def independent_read(self, path):
        """The file's arrays by another reader, for checking a load that succeeded."""
        if zipfile.is_zipfile(path):
            with np.load(path, allow_pickle=False) as archive:
                return {k: archive[k] for k in archive.files if k != "__tensormoe__"}
        import ml_dtypes  # noqa: F401  (bfloat16 for numpy)
        import safetensors.numpy

        return {k.removeprefix("params."): v for k, v in safetensors.numpy.load_file(path).items()}

    def loaders(self):
        io = self.io
        out = [(f"load({name})", lambda p, t=target: io.load(t, p)) for name, target in self.targets.items()]
        return out + [("layer_from_file", io.layer_from_file), ("read_config", io.read_config)]

    def run(self, case, path=None):
        """Every loader on the case's file; returns the error messages (an AssertionError on a bad outcome)."""
        path = path or os.path.join(self.folder, "case.bin")
        if case.write is not None:
            case.write(path)
        else:
            with open(path, "wb") as f:
                f.write(case.content)
        self.examples += 1
        self.kinds[case.kind] = self.kinds.get(case.kind, 0) + 1
        messages = {}
        for name, loader in self.loaders():
            self.calls += 1
            start = time.perf_counter()
            try:
                result = loader(path)
            except ValueError as err:
                message = str(err)
                assert message.startswith("cannot load tensormoe weights from") or "its tensors" in message, message
                messages[name] = message
                continue
            except BaseException as err:  # MemoryError, KeyError, ...: never acceptable
                raise AssertionError(f"{case.kind}: {name} raised {type(err).__name__}: {err}") from err
            finally:
                self.slowest = max(self.slowest, time.perf_counter() - start)
            may_succeed = not case.must_fail or (name == "read_config" and case.header_ok)
            assert may_succeed, f"{case.kind}: {name} accepted a file it must refuse"
            self.accepted += 1
            if name != "read_config":  # a success loads exactly what an independent reader finds
                expected = self.independent_read(path)
                got = self.snapshot(result)
                assert set(got) == set(expected), (case.kind, name, sorted(got), sorted(expected))
                for key, value in expected.items():
                    np.testing.assert_array_equal(got[key], value, err_msg=f"{case.kind}: {name}: {key}")
            if name.startswith("load("):  # put the target back for the next cases
                self.io.load(result, self.st_path)
        for name, target in self.targets.items():
            now = self.snapshot(target)
            assert all(np.array_equal(now[k], self.snapshots[name][k]) for k in now), f"{case.kind}: {name} changed"
        return messages


# -- the issue's cases ---------------------------------------------------------------------------------------


def issue_cases(child):
    """The rows of issue 15: each must be refused with a ValueError, under the cap."""
    header, data = child.st_header, child.st_data
    meta = header["__metadata__"]

    def st_config(**changes):
        config = {**json.loads(meta["config"]), **changes}
        return _st_bytes({**header, "__metadata__": {**meta, "config": json.dumps(config)}}, data)

    def npz_config(**changes):
        h = {**child.npz_header, "config": {**child.npz_header["config"], **changes}}
        raw = np.frombuffer(json.dumps(h).encode(), dtype=np.uint8)
        buffer = _io.BytesIO()
        np.save(buffer, raw)
        return _zip({**child.npz_entries, "__tensormoe__.npy": buffer.getvalue()}.items())

    f32_as_f64 = {**child.npz_header, "dtypes": {**child.npz_header["dtypes"], "factor_0": "float64"}}
    buffer = _io.BytesIO()
    np.save(buffer, np.frombuffer(json.dumps(f32_as_f64).encode(), dtype=np.uint8))
    return [
        ("safetensors file, config expert_dims=[10**9]", Case("issue", st_config(expert_dims=[10**9, 3]), header_ok=True)),
        (".npz file, config expert_dims=[10**9]", Case("issue", npz_config(expert_dims=[10**9, 3]), header_ok=True)),
        ("safetensors file, config rank=10**8", Case("issue", st_config(rank=10**8), header_ok=True)),
        # 720 MB of parameters: under the default limit, but far more than the file stores
        ("safetensors file, config expert_dims=[3 * 10**7] (under the memory limit)",
         Case("issue", st_config(expert_dims=[3 * 10**7, 3]), header_ok=True)),
        (".npz file, config rank=10**8", Case("issue", npz_config(rank=10**8), header_ok=True)),
        ("zip bomb: 512 MiB of zeros in one entry", Case("issue", write=_bomb_writer(
            child.npz_entries, "factor_0.npy", (4, BOMB_BYTES // 16), BOMB_BYTES), header_ok=True)),
        (".npz entry claiming shape (2**32, 2**32)", Case("issue", _zip(
            {**child.npz_entries, "factor_0.npy": _npy((2**32, 2**32))}.items()))),
        ("safetensors tensor claiming shape (2**32, 2**32)", Case("issue", _st_bytes(
            {**header, "params.factor_0": {**header["params.factor_0"], "shape": [2**32, 2**32]}}, data))),
        (".npz header says float64, array is float32", Case("issue", _zip(
            {**child.npz_entries, "__tensormoe__.npy": buffer.getvalue()}.items()))),
        ("safetensors config says float64, tensors are float32", Case("issue", st_config(dtype="float64"))),
    ]


CONSTRUCTORS = [
    "tensormoe.CPMMoE(6, 4, [10**9], rank=3)",
    "tensormoe.CPMMoE(6, 4, [128], rank=10**9)",
    "tensormoe.TTMMoE(6, 4, [128], ranks=10**5)",
    "tensormoe.torch.CPMMoE(6, 4, [10**9], rank=3)",
    "tensormoe.jax.TTMMoE(6, 4, [128], ranks=10**5)",
]


# -- hypothesis-generated files ---------------------------------------------------------------------------------


def hostile_files(child):
    from hypothesis import strategies as st

    header, data = child.st_header, child.st_data
    names = sorted(k for k in header if k != "__metadata__")
    meta = header["__metadata__"]
    config = json.loads(meta["config"])
    huge = st.one_of(st.integers(0, 16), st.integers(2**20, 2**40), st.integers(2**31, 2**65),
                     st.sampled_from([-1, 10**100, 2**63, 2**64 - 1]))
    junk = st.one_of(st.none(), st.booleans(), huge, st.floats(allow_nan=False), st.text(max_size=8),
                     st.lists(huge, max_size=4), st.dictionaries(st.text(max_size=4), huge, max_size=2),
                     st.sampled_from([[10**9], [[1, 2]], "CPMMoE", "float64", "int8", {"a": [1]}, [1] * 300]))
    config_keys = st.sampled_from(sorted(config) + ["hierarchy", "max_bytes", "__class__", ""])
    dtype_codes = st.sampled_from(["F32", "F16", "F64", "BF16", "I32", "I8", "U8", "BOOL", "C64", "F8_E4M3", "f32",
                                   "", "F32 "])
    descrs = st.sampled_from(["<f4", "<f2", "<f8", ">f4", "<i8", "|O", "|b1", "<c8", "<U3", "|V8", "<M8[s]"])
    entries = child.npz_entries

    @st.composite
    def st_tensor_field(draw):
        name = draw(st.sampled_from(names))
        field = draw(st.sampled_from(["shape", "data_offsets", "dtype", "extra", "drop", "whole"]))
        info = dict(header[name])
        if field == "shape":
            info["shape"] = draw(st.lists(huge, min_size=0, max_size=4))
        elif field == "data_offsets":
            info["data_offsets"] = draw(st.lists(huge, min_size=0, max_size=3))
        elif field == "dtype":
            info["dtype"] = draw(dtype_codes)
        elif field == "extra":
            info[draw(st.text(min_size=1, max_size=5))] = draw(junk)
        elif field == "drop":
            del info[draw(st.sampled_from(sorted(info)))]
        else:
            info = draw(junk)
        unchanged = info == header[name]
        begin, end = header[name]["data_offsets"]
        # another shape of the same size leaves the header sound: read_config reads it, the loaders refuse it
        sound = field == "shape" and all(n >= 0 for n in info["shape"]) and math.prod(info["shape"]) * 4 == end - begin
        return Case(f"safetensors {field}", _st_bytes({**header, name: info}, data), must_fail=not unchanged,
                    header_ok=sound)

    @st.composite
    def st_names(draw):
        h = dict(header)
        what = draw(st.sampled_from(["rename", "add", "drop"]))
        if what == "rename":
            old = draw(st.sampled_from(names))
            new = draw(st.one_of(st.text(max_size=12), st.sampled_from(["params.evil", "params.", "weight",
                                                                         "params.factor_9", "__metadata__"])))
            h[new] = h.pop(old)
            return Case("safetensors rename", _st_bytes(h, data), must_fail=False)  # a name may land on another
        if what == "add":
            size = draw(st.integers(0, 4))
            h[draw(st.sampled_from(["params.extra", "params.gate_9", "x"]))] = {
                "dtype": "F32", "shape": [size], "data_offsets": [len(data), len(data) + 4 * size]}
            return Case("safetensors add", _st_bytes(h, data + bytes(4 * size)), must_fail=False)
        gone = draw(st.sampled_from(names))
        begin, end = h.pop(gone)["data_offsets"]
        kept = {k: ({**v, "data_offsets": [v["data_offsets"][0] - (end - begin) * (v["data_offsets"][0] >= end),
                                           v["data_offsets"][1] - (end - begin) * (v["data_offsets"][0] >= end)]}
                    if k != "__metadata__" else v) for k, v in h.items()}
        return Case("safetensors drop", _st_bytes(kept, data[:begin] + data[end:]), must_fail=False)

    @st.composite
    def st_metadata(draw):
        what = draw(st.sampled_from(["config key", "config value", "format", "version", "no metadata", "config"]))
        m = dict(meta)
        if what in ("config key", "config value"):
            c = dict(config)
            c[draw(config_keys)] = draw(junk)
            m["config"] = json.dumps(c)
        elif what == "config":
            m["config"] = draw(st.one_of(st.text(max_size=20), st.just("[" * 5000), st.just('{"a": ' * 3000)))
        elif what in ("format", "version"):
            m[what] = draw(st.text(max_size=6))
        h = {**header, "__metadata__": m}
        if what == "no metadata":
            del h["__metadata__"]
        must = what in ("no metadata", "config") or m.get("format") != "tensormoe" or m.get("version") != "1"
        return Case(f"safetensors {what}", _st_bytes(h, data), must_fail=must)

    @st.composite
    def st_length(draw):
        length = draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(0, len(child.st_raw))))
        raw = length.to_bytes(8, "little") + child.st_raw[8:]
        return Case("safetensors header length", raw, must_fail=raw != child.st_raw)

    @st.composite
    def npz_entry(draw):
        name = draw(st.sampled_from(sorted(n for n in entries if n != "__tensormoe__.npy")))
        what = draw(st.sampled_from(["claim", "pickle", "object array", "garbage"]))
        if what == "claim":
            shape, descr = tuple(draw(st.lists(huge.filter(lambda n: n >= 0), max_size=3))), draw(descrs)
            data = draw(st.binary(max_size=64))
            content = _npy(shape, descr, data, draw(st.booleans()))
            fits = np.dtype(descr).kind == "f" and len(data) == int(np.prod(shape, dtype=object)) * np.dtype(descr).itemsize
            # a sound .npy header: read_config reads the file; the loaders take it only with the layer's shape and dtype
            valid = fits and shape == child.shapes[name] and descr in ("<f4", ">f4")
            return Case("npz entry claim", _zip({**entries, name: content}.items()), must_fail=not valid, header_ok=fits)
        elif what == "pickle":
            content = pickle.dumps({"factor_0": [1, 2, 3]})
        elif what == "object array":
            buffer = _io.BytesIO()
            np.save(buffer, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
            content = buffer.getvalue()
        else:
            content = draw(st.binary(max_size=200))
        return Case(f"npz entry {what}", _zip({**entries, name: content}.items()), must_fail=content != entries[name])

    @st.composite
    def npz_members(draw):
        what = draw(st.sampled_from(["extra", "missing", "duplicate", "header"]))
        items = list(entries.items())
        if what == "extra":
            items.append((draw(st.sampled_from(["evil.npy", "gate_9.npy", "a/b.npy", "__tensormoe__.npy"])),
                          draw(st.binary(max_size=100))))
        elif what == "missing":
            items.pop(draw(st.integers(0, len(items) - 1)))
        elif what == "duplicate":
            items.append(items[draw(st.integers(0, len(items) - 1))])
        else:
            h = dict(child.npz_header)
            part = draw(st.sampled_from(["config", "dtypes", "format", "version", "whole"]))
            if part == "config":
                h["config"] = {**h["config"], draw(config_keys): draw(junk)}
            elif part == "dtypes":
                h["dtypes"] = {**h["dtypes"], draw(st.sampled_from(sorted(h["dtypes"]) + ["x"])): draw(junk)}
            elif part == "whole":
                h = draw(junk)
            else:
                h[part] = draw(junk)
            buffer = _io.BytesIO()
            np.save(buffer, np.frombuffer(json.dumps(h).encode(), dtype=np.uint8))
            items = [(n, buffer.getvalue() if n == "__tensormoe__.npy" else d) for n, d in items]
            return Case(f"npz header {part}", _zip(items), must_fail=False)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
            return Case(f"npz {what}", _zip(items), must_fail=True)

    @st.composite
    def npz_sizes(draw):
        """The zip's central directory declares another size for one entry."""
        raw = bytearray(child.npz_raw)
        start = raw.rfind(b"PK\x05\x06")
        (directory,) = struct.unpack_from("<I", raw, start + 16)
        position, count = directory, draw(st.integers(0, len(entries) - 1))
        for _ in range(count):
            n, m, k = struct.unpack_from("<HHH", raw, position + 28)
            position += 46 + n + m + k
        field = draw(st.sampled_from([20, 24]))  # compressed or uncompressed size
        value = draw(st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 300)))
        struct.pack_into("<I", raw, position + field, value)
        try:  # another uncompressed size must be refused (the .npy header's claim no longer fits it)
            with zipfile.ZipFile(_io.BytesIO(bytes(raw))) as archive:
                changed = [i.file_size for i in archive.infolist()] != [i.file_size for i in zipfile.ZipFile(
                    _io.BytesIO(child.npz_raw)).infolist()]
        except zipfile.BadZipFile:
            changed = True
        return Case("npz declared size", bytes(raw), must_fail=changed)

    @st.composite
    def npz_bomb(draw):
        name = draw(st.sampled_from(sorted(n for n in entries if n != "__tensormoe__.npy")))
        nbytes = draw(st.integers(1, 8)) * 2**20
        shape = draw(st.sampled_from([(nbytes // 4,), (4, nbytes // 16), (2**40,), (2**32, 2**32)]))
        return Case("npz zip bomb", write=_bomb_writer(entries, name, shape, nbytes), header_ok=True)

    @st.composite
    def generic(draw):
        raw = draw(st.sampled_from([child.st_raw, child.npz_raw]))
        what = draw(st.sampled_from(["truncated", "flipped", "random", "other layer"]))
        if what == "truncated":
            return Case("truncated", raw[: draw(st.integers(0, len(raw) - 1))])
        if what == "flipped":
            flipped = bytearray(raw)
            for position in draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=8)):
                flipped[position] ^= draw(st.integers(1, 255))
            return Case("flipped bytes", bytes(flipped), must_fail=False)
        if what == "random":
            prefix = draw(st.sampled_from([b"", b"PK\x03\x04", b"PK\x05\x06", b"\x80\x04", b"\x93NUMPY"]))
            return Case("random bytes", prefix + draw(st.binary(max_size=300)))
        return Case("other layer", draw(st.sampled_from(child.others)), must_fail=False)

    return st.one_of(st_tensor_field(), st_names(), st_metadata(), st_length(), npz_entry(), npz_members(),
                     npz_sizes(), npz_bomb(), generic())


def child_main(folder, examples, seed=None):
    import resource
    import warnings

    import hypothesis
    from hypothesis import HealthCheck, given, settings

    import tensormoe
    from tensormoe.factorizations import OverparameterizedWarning

    shells = {"pytorch": "tensormoe.torch", "jax": "tensormoe.jax"}
    for backend in tensormoe.available_backends():  # the shells' constructors run below: imported before the cap
        if backend in shells:
            __import__(shells[backend])

    warnings.simplefilter("ignore", OverparameterizedWarning)  # rank=10**8 warns, then is refused
    child = Child(folder)
    cases = issue_cases(child)
    strategy = hostile_files(child)

    def status():
        return {k: int(v.split()[0]) * 1024 for k, v in
                (line.split(":") for line in open("/proc/self/status") if line.startswith(("VmSize", "VmRSS")))}

    base = status()
    cap = base["VmSize"] + HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    try:  # the cap is in force: the headroom and a little more cannot be allocated
        np.ones(HEADROOM + 2**20, dtype=np.uint8)
        raise AssertionError("RLIMIT_AS did not cap the address space")
    except MemoryError:
        pass
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()

    summary_cases = []
    for label, case in cases:
        messages = child.run(case)
        assert set(messages) >= {name for name, _ in child.loaders()} - {"read_config"}, (label, messages)
        summary_cases.append({"case": label, "error": "ValueError", "message": messages["layer_from_file"][:300]})
    missing = {name for backend, name in shells.items() if backend not in child.backends}
    for call in [c for c in CONSTRUCTORS if not any(c.startswith(m + ".") for m in missing)]:
        try:
            eval(call, {"tensormoe": tensormoe})  # noqa: S307  (this file's own literals)
            raise AssertionError(f"{call} was accepted")
        except ValueError as err:
            summary_cases.append({"case": call, "error": "ValueError", "message": str(err)[:300]})

    @settings(max_examples=examples, deadline=None, derandomize=seed is None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def fuzz(case):
        child.run(case)

    if seed is not None:
        fuzz = hypothesis.seed(seed)(fuzz)

    fuzz()
    print(json.dumps({
        "examples": child.examples - len(cases), "calls": child.calls, "accepted_calls": child.accepted,
        "kinds": dict(sorted(child.kinds.items())), "issue_cases": summary_cases,
        "cap_bytes": cap, "headroom_bytes": HEADROOM, "vm_before_bytes": base["VmSize"],
        "rss_before_bytes": rss_before, "rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_growth_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before,
        "slowest_call_s": round(child.slowest, 3), "seconds": round(time.perf_counter() - start, 1),
        "backends": child.backends,
    }))


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5) or sys.argv[1] != "--child":
        sys.exit("usage: python tests/test_file_fuzz.py --child FOLDER EXAMPLES [SEED]  (run by pytest; a SEED "
                 "draws other cases than the fixed ones)")
    child_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) == 5 else None)
