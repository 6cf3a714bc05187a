"""Portable weights: save a layer from any backend, load it into any other.

:func:`save` writes a `safetensors <https://huggingface.co/docs/safetensors>`_
file, the ecosystem's safe format that PyTorch, NumPy, JAX and others read
natively:

* one tensor per parameter, named as in a :mod:`tensormoe.torch` module's
  ``state_dict`` (``params.factor_0``, ..., ``params.core`` for Tucker,
  ``params.gate_0``, ...), each in its own dtype, ``bfloat16`` included;
* the metadata ``format`` (``"tensormoe"``), ``version`` and ``config``, the
  layer's configuration (:meth:`tensormoe.layers.MMoE.config`) as JSON.

So ``module.load_state_dict(safetensors.torch.load_file(path))`` loads a file
into a module, and ``safetensors.numpy.load_file(path)`` reads its arrays.  A
path ending in ``.npz`` still gets the earlier format, a NumPy archive (a zip of
``.npy`` files with the header ``__tensormoe__.npy``), and both formats are read.

Loading checks a file's header alone, before any parameter is read and before
anything is built: its size (the total must fit
:func:`tensormoe.validation.memory_limit`), that its tensors tile its bytes (no
tensor claims more bytes than the file holds), that every name is expected and
that the shapes and dtypes the configuration implies are the stored ones.  In an
``.npz`` archive the same checks run on the ``.npy`` headers and on the zip's
declared sizes before anything is decompressed.  Nothing is ever unpickled, and
the configuration is plain JSON, so loading a file never runs code from it.
Anything wrong raises a ``ValueError`` naming the file and the problem, and
leaves the target layer unchanged.

The layer may be a functional :class:`tensormoe.MMoE`, a
:mod:`tensormoe.torch` module or a :mod:`tensormoe.jax` pytree layer: a model
trained in PyTorch serves in NumPy or JAX with the very same weights.

Examples
--------
>>> import os, tempfile
>>> import numpy as np
>>> import tensormoe
>>> from tensormoe import io
>>> layer = tensormoe.CPMMoE(4, 3, [5], rank=2, seed=1)
>>> path = os.path.join(tempfile.mkdtemp(), "layer.safetensors")
>>> io.save(layer, path)
>>> copy = io.layer_from_file(path)
>>> x = np.ones((2, 4), dtype="float32")
>>> bool(np.array_equal(copy(x), layer(x)))
True
>>> import safetensors.numpy
>>> sorted(safetensors.numpy.load_file(path))
['params.factor_0', 'params.factor_1', 'params.factor_2', 'params.gate_0']
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from .. import validation as _v
from .._array import backend_of, dtype_name, to_numpy
from ..backend import backend_context, get_backend
from ..frameworks import get_ops
from ..layers import MMoE, convert_params
from ..layers.mmoe import LAYERS
from ..routing.batchnorm import BatchNormState

__all__ = ["FORMAT", "FORMAT_VERSION", "load", "layer_from_file", "read_config", "save"]

FORMAT = "tensormoe"
"""Name of the format, stored in the metadata of every file.

Examples
--------
>>> FORMAT
'tensormoe'
"""

FORMAT_VERSION = 1
"""Version of the format that :func:`save` writes and :func:`load` reads.

Examples
--------
>>> FORMAT_VERSION
1
"""

#: tensor names: a torch module's state_dict keys (its ParameterDict is called "params")
_PREFIX = "params."
#: safetensors dtype codes of the dtypes a layer can hold
_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
#: a tensormoe header is a few KiB; a larger one is not ours (safetensors itself allows 100 MB)
_MAX_HEADER_BYTES = 1 << 20
_NPZ_HEADER = "__tensormoe__"
# configuration entries that must agree between a file and the layer it is loaded into
# (the rest - seed, init_std, dtype, optimize - do not change what the weights compute)
# (a file written before gate_rank existed has no entry: .get gives None, the full gates it holds)
_MUST_MATCH = (
    "class", "in_dim", "out_dim", "expert_dims", "rank", "ranks", "bias", "gate", "gate_norm", "router", "gate_rank"
)
_CLASSES = {cls.__name__: cls for cls in LAYERS.values()}


#: the running statistics of BatchNorm gates (gate_norm="batchnorm"), stored next to the parameters as
#: norm_{h}_mean, norm_{h}_var (the parameters' dtype) and norm_{h}_count (float64, exact to 2**53; shape (1,):
#: safetensors stores no 0-d arrays)
_NORM_FIELDS = ("mean", "var", "count")


def _norm_shapes(core: MMoE) -> dict[str, tuple[int, ...]]:
    if core.gate_norm != "batchnorm":
        return {}
    return {f"norm_{h}_{field}": ((1,) if field == "count" else (n,))
            for h, n in enumerate(core.expert_dims) for field in _NORM_FIELDS}


def _is_count(name: str) -> bool:
    return name.startswith("norm_") and name.endswith("_count")


def _norm_arrays(layer: Any, core: MMoE) -> dict[str, np.ndarray]:
    """The running statistics a save writes: a torch module's buffers, else the functional layer's own."""
    if core.gate_norm != "batchnorm":
        return {}
    state = layer._norm_state() if hasattr(layer, "_norm_state") else core.norm_state
    return {f"norm_{h}_{field}": (np.asarray(to_numpy(value), dtype=np.float64).reshape(1) if field == "count"
                                  else to_numpy(value))
            for h, level in enumerate(state) for field, value in zip(_NORM_FIELDS, level)}


def _assign_norm_state(layer: Any, core: MMoE, arrays: Mapping[str, np.ndarray], like: Any) -> None:
    """Give ``layer`` the statistics in ``arrays`` (on the backend, device and dtype of ``like``)."""
    if core.gate_norm != "batchnorm":
        return
    ops = get_ops(backend_of(like))
    state = tuple(
        BatchNormState(*(ops.asarray(np.asarray(arrays[f"norm_{h}_count"], dtype=np.int64).reshape(()), like=like)
                         if field == "count" else ops.asarray(arrays[f"norm_{h}_{field}"], dtype_name(like), like=like)
                         for field in _NORM_FIELDS))
        for h in range(len(core.expert_dims))
    )
    if hasattr(layer, "_keep_norm_state"):
        layer._keep_norm_state(state)  # a torch module: into its buffers
    else:
        core.norm_state = state


def _core_and_params(layer: Any, argument: str = "layer") -> tuple[MMoE, Mapping[str, Any]]:
    """The functional layer and the parameters of a functional layer or a framework shell."""
    if isinstance(layer, MMoE):
        return layer, layer.params
    core = getattr(layer, "layer", None)
    if isinstance(core, MMoE) and hasattr(layer, "_assign_params"):
        return core, dict(layer.params.items())
    raise TypeError(
        f"{argument} must be a tensormoe layer (tensormoe.MMoE, a tensormoe.torch module or a tensormoe.jax "
        f"layer); got {type(layer).__name__}"
    )


# -- writing ------------------------------------------------------------------------------
def _write_safetensors(path: str, config: dict[str, Any], dtypes: dict[str, str], arrays: dict[str, np.ndarray]):
    tensors = {}
    for name, array in arrays.items():
        # bfloat16 leaves the frameworks as float32 holding bfloat16 values: the cast back is exact
        dtype = ml_dtypes.bfloat16 if dtypes[name] == "bfloat16" else np.dtype(dtypes[name]).newbyteorder("<")
        tensors[_PREFIX + name] = np.ascontiguousarray(array.astype(dtype, copy=False))
    metadata = {"format": FORMAT, "version": str(FORMAT_VERSION), "config": json.dumps(config)}
    safetensors.numpy.save_file(tensors, path, metadata=metadata)


def _write_npz(path: str, config: dict[str, Any], dtypes: dict[str, str], arrays: dict[str, np.ndarray]):
    # the earlier format: bfloat16 stored as float32 (exactly), the header a uint8 array of JSON
    header = {"format": FORMAT, "version": FORMAT_VERSION, "config": config, "dtypes": dtypes}
    entries = {**arrays, _NPZ_HEADER: np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)}
    with open(path, "wb") as f:
        np.savez(f, **entries)


_WRITERS = {"safetensors": _write_safetensors, "npz": _write_npz}


def save(layer: Any, path: str | os.PathLike, *, format: str | None = None) -> None:
    """Write a layer's configuration and parameters to ``path``.

    Parameters
    ----------
    layer : tensormoe.MMoE, tensormoe.torch module or tensormoe.jax layer
        Parameters may live on any backend and device, in any dtype.  With
        ``gate_norm="batchnorm"`` its running statistics are written too (a torch
        module's buffers; otherwise the functional layer's ``norm_state``), and
        :func:`load` and :func:`layer_from_file` restore them.
    path : str or os.PathLike
        The file to write (no suffix is added).  It is written to a temporary
        file first and then moved into place, so an interrupted save never leaves
        a half-written file at ``path``.
    format : {"safetensors", "npz"}, optional
        Default: ``"npz"`` for a path ending in ``.npz`` (the earlier format,
        for older readers), ``"safetensors"`` for every other path.

    Examples
    --------
    >>> import os, tempfile, tensormoe
    >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
    >>> save(tensormoe.TTMMoE(4, 3, [5], ranks=2), path)
    >>> read_config(path)["class"]
    'TTMMoE'
    """
    if format is None:
        format = "npz" if os.fspath(path).lower().endswith(".npz") else "safetensors"
    format = _v.check_choice(format, "format", sorted(_WRITERS), what="a weights format")
    core, params = _core_and_params(layer)
    config = layer.config() if hasattr(layer, "config") else core.config()
    dtypes = {name: dtype_name(value) for name, value in params.items()}
    arrays = {name: to_numpy(value) for name, value in params.items()}
    norms = _norm_arrays(layer, core)
    dtypes.update({name: "float64" if _is_count(name) else dtypes[next(iter(params))] for name in norms})
    arrays.update(norms)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tensormoe-", suffix="." + format, dir=folder)
    try:
        os.close(fd)
        _WRITERS[format](tmp, config, dtypes, arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# -- reading ------------------------------------------------------------------------------
class _File:
    """What a weights file holds, from its header alone: configuration, stored shapes and dtypes.

    Subclasses parse one container; :meth:`read` reads the arrays once every check passed.
    """

    container = ""

    def __init__(self, path: str, max_bytes: int | None) -> None:
        self.path = path
        self.config: dict[str, Any] = {}
        #: name -> shape and name -> dtype the layer gets (``bfloat16`` where an .npz stores float32)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        #: bytes of each array as stored
        self.stored_dtypes: dict[str, str] = {}
        self._parse()
        self._check_header(max_bytes)

    def _parse(self) -> None:
        raise NotImplementedError

    def read(self) -> dict[str, np.ndarray]:
        """The arrays, by parameter name (``bfloat16`` as ``float32``, exactly)."""
        raise NotImplementedError

    def error(self, problem: str) -> ValueError:
        return ValueError(f"cannot load tensormoe weights from {self.path!r}: {problem}")

    def _config_from(self, text: Any, where: str) -> dict[str, Any]:
        try:
            config = json.loads(text) if isinstance(text, (str, bytes)) else text
        except (ValueError, RecursionError) as err:
            raise self.error(f"{where} is not valid JSON ({type(err).__name__}: {str(err)[:200]})") from None
        if not isinstance(config, dict):
            raise self.error(f"{where} is {type(config).__name__}; expected a JSON object (the layer's config())")
        return config

    def _check_header(self, max_bytes: int | None) -> None:
        dtype = self.config.get("dtype")
        if dtype not in _v.FLOAT_DTYPES:
            raise self.error(f"its configuration has dtype={dtype!r}; expected one of {list(_v.FLOAT_DTYPES)}")
        other = sorted({name for name, d in self.dtypes.items() if d != ("float64" if _is_count(name) else dtype)})
        if other:
            raise self.error(
                f"parameter {other[0]!r} is stored as {self.dtypes[other[0]]}; its configuration says dtype={dtype!r}"
            )
        for name in self.shapes:
            if not name.isidentifier():
                raise self.error(f"it holds a tensor named {name!r}, which no layer has")
        _v.check_memory(self.shapes, self.stored_dtypes, f"cannot load tensormoe weights from {self.path!r}: its "
                        "tensors", max_bytes)

    def build(self, dtype: str, max_bytes: int | None) -> MMoE:
        """The layer the configuration describes, without parameters; refused if it is larger than the file."""
        kwargs = {k: v for k, v in self.config.items() if k != "class"}
        name = self.config.get("class")
        if not isinstance(name, str) or name not in _CLASSES or "max_bytes" in kwargs:
            problem = f"class {name!r}" if "max_bytes" not in kwargs else "the key 'max_bytes'"
            raise self.error(f"its configuration has {problem}; expected a class in {sorted(_CLASSES)} and its "
                             "constructor arguments (the layer's config())")
        # the layer may hold no more parameters than the file stores: a small file cannot ask for a big layer
        stored = sum(math.prod(shape) for shape in self.shapes.values())
        bound = min(_v.memory_limit(max_bytes), max(stored, 1) * _v.ITEMSIZE[dtype])
        try:
            layer = _CLASSES[name](**{**kwargs, "dtype": dtype}, max_bytes=bound, init=False)
        except (TypeError, ValueError, OverflowError) as err:
            raise self.error(
                f"its configuration does not build a layer of the {stored:,} parameters it stores ({err})"
            ) from None
        return layer

    def check_fits(self, core: MMoE) -> None:
        """Raise unless the file's configuration, names and shapes are those of ``core``."""
        target = core.config()
        diffs = [
            f"{key}={self.config.get(key)!r} (the layer has {target.get(key)!r})"
            for key in _MUST_MATCH
            if self.config.get(key) != target.get(key)
        ]
        if diffs:
            raise self.error("it holds another layer: " + ", ".join(diffs))
        shapes = {**core.param_shapes(), **_norm_shapes(core)}
        if set(self.shapes) != set(shapes):
            missing, extra = sorted(set(shapes) - set(self.shapes)), sorted(set(self.shapes) - set(shapes))
            raise self.error(
                f"it holds the parameters {sorted(self.shapes)}; the layer has {sorted(shapes)}"
                + (f" (missing {missing})" if missing else "") + (f" (unexpected {extra})" if extra else "")
            )
        for name, shape in shapes.items():
            if self.shapes[name] != tuple(shape):
                raise self.error(f"parameter {name!r} has shape {self.shapes[name]}; the layer expects {shape}")


class _SafetensorsFile(_File):
    container = "safetensors"

    def _parse(self) -> None:
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise self.error(f"it has {len(head)} bytes: empty or truncated (a safetensors file starts with an "
                                 "8-byte header length)")
            length = int.from_bytes(head, "little")
            if length > _MAX_HEADER_BYTES:
                raise self.error(
                    f"its first 8 bytes {head!r} claim a {length:,}-byte header; expected at most "
                    f"{_MAX_HEADER_BYTES:,}: it is not a safetensors file or .npz archive written by tensormoe"
                )
            if 8 + length > size:
                raise self.error(f"its header claims {length:,} bytes but the file has {size - 8:,} after the "
                                 "length: truncated")
            raw = f.read(length)
        self._data_bytes = size - 8 - length
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=self._unique)
        except (ValueError, RecursionError) as err:
            raise self.error(f"its header is not valid JSON ({type(err).__name__}: {str(err)[:200]})") from None
        if not isinstance(header, dict):
            raise self.error(f"its header is a JSON {type(header).__name__}; expected an object")
        metadata = header.pop("__metadata__", None)
        if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
            raise self.error(f"its metadata does not name the format {FORMAT!r} (not written by tensormoe.tools.io.save)")
        if metadata.get("version") != str(FORMAT_VERSION):
            raise self.error(f"format version {metadata.get('version')!r}; this tensormoe reads {FORMAT_VERSION}")
        self.config = self._config_from(metadata.get("config"), "its metadata's config")
        spans = []
        for key, info in header.items():
            if not key.startswith(_PREFIX):
                raise self.error(f"it holds a tensor named {key!r}; expected names {_PREFIX}<parameter>")
            name = key[len(_PREFIX):]
            shape, dtype, begin, end = self._tensor(key, info)
            self.shapes[name], self.dtypes[name], self.stored_dtypes[name] = shape, dtype, dtype
            spans.append((begin, end, key))
        # the tensors tile the data exactly: no holes, no overlaps, nothing beyond the file
        position = 0
        for begin, end, key in sorted(spans):
            if begin != position:
                raise self.error(f"tensor {key!r} starts at byte {begin:,} of the data; expected {position:,} "
                                 "(tensors must tile the data without gaps or overlaps)")
            position = end
        if position != self._data_bytes:
            raise self.error(f"its tensors cover {position:,} bytes but the file holds {self._data_bytes:,} bytes of "
                             "data: truncated, or not a safetensors file")

    def _unique(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            raise self.error(f"its header repeats a key ({[k for k, _ in pairs]!r:.200})")
        return out

    def _tensor(self, key: str, info: Any) -> tuple[tuple[int, ...], str, int, int]:
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise self.error(f"tensor {key!r} is described by {info!r:.200}; expected dtype, shape and data_offsets")
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if code not in _DTYPES:
            raise self.error(f"tensor {key!r} has dtype {code!r:.40}; expected one of {sorted(_DTYPES)}")
        if not isinstance(shape, list) or not all(_v.is_int(n) and n >= 0 for n in shape):
            raise self.error(f"tensor {key!r} has shape {shape!r:.200}; expected a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_v.is_int(n) for n in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise self.error(f"tensor {key!r} has data_offsets {offsets!r:.200}; expected [begin, end], 0 <= begin "
                             "<= end")
        dtype = _DTYPES[code]
        nbytes = math.prod(shape) * _v.ITEMSIZE[dtype]  # Python integers: a claimed (2**32, 2**32) does not wrap
        if nbytes != offsets[1] - offsets[0]:
            raise self.error(f"tensor {key!r} claims shape {tuple(shape)} of {dtype} ({nbytes:,} bytes) but spans "
                             f"{offsets[1] - offsets[0]:,} bytes")
        return tuple(shape), dtype, offsets[0], offsets[1]

    def read(self) -> dict[str, np.ndarray]:
        try:
            with safetensors.safe_open(self.path, framework="numpy") as f:
                arrays = {name: f.get_tensor(_PREFIX + name) for name in self.shapes}
        except (safetensors.SafetensorError, OSError, ValueError, TypeError) as err:
            raise self.error(f"its tensors cannot be read ({type(err).__name__}: {str(err)[:200]})") from None
        out = {}
        for name, array in arrays.items():
            if array.shape != self.shapes[name] or dtype_name(array) != self.dtypes[name]:
                raise self.error(f"tensor {_PREFIX + name!r} changed while it was read")
            out[name] = array.astype(np.float32) if self.dtypes[name] == "bfloat16" else array
        return out


class _NpzFile(_File):
    container = "npz"

    def _parse(self) -> None:
        self._check_directory()
        with self._archive() as archive:
            infos = archive.infolist()
            members = [info.filename for info in infos]
            if len(set(members)) != len(members):
                raise self.error("it holds two entries of the same name")
            if _NPZ_HEADER + ".npy" not in members:
                raise self.error(f"it has no {_NPZ_HEADER!r} entry (not written by tensormoe.tools.io.save)")
            header = self._parse_header(archive)
            self.config = self._config_from(header.get("config"), "its header's config")
            dtypes = header.get("dtypes")
            if not isinstance(dtypes, dict) or not dtypes:
                raise self.error("its header lacks the 'dtypes' entry")
            for name, dtype in dtypes.items():
                if not isinstance(name, str) or not name.isidentifier() or dtype not in _v.FLOAT_DTYPES:
                    raise self.error(f"its header lists the parameter {name!r:.100} with dtype {dtype!r:.40}")
            unexpected = sorted(set(members) - {name + ".npy" for name in dtypes} - {_NPZ_HEADER + ".npy"})
            if unexpected:
                raise self.error(f"it holds unexpected entries {unexpected}")
            missing = sorted(name for name in dtypes if name + ".npy" not in members)
            if missing:
                raise self.error(f"it lacks the parameters {missing} listed in its header")
            for name, dtype in dtypes.items():
                shape, stored = self._npy_header(archive, name + ".npy")
                expected = "float32" if dtype == "bfloat16" else dtype
                if stored.name != expected:
                    raise self.error(f"parameter {name!r} is stored as {stored}; its header says {dtype}")
                self.shapes[name], self.dtypes[name], self.stored_dtypes[name] = shape, dtype, stored.name

    def _check_directory(self) -> None:
        """Refuse a zip directory larger than a tensormoe archive's before zipfile reads it (one object per entry)."""
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            tail_start = max(0, size - (22 + 65535))  # the end record: 22 bytes and a comment of up to 64 KiB
            f.seek(tail_start)
            tail = f.read()
            end = tail.rfind(b"PK\x05\x06")
            if end < 0 or len(tail) - end < 22:
                return  # zipfile names the problem (not a zip, truncated)
            entries, directory = int.from_bytes(tail[end + 10: end + 12], "little"), int.from_bytes(
                tail[end + 12: end + 16], "little")
            locator = end - 20  # a zip64 archive keeps its real counts in a record this locator points to
            if locator >= 0 and tail[locator: locator + 4] == b"PK\x06\x07":
                f.seek(int.from_bytes(tail[locator + 8: locator + 16], "little"))
                record = f.read(56)
                if record[:4] == b"PK\x06\x06" and len(record) == 56:
                    entries = int.from_bytes(record[32:40], "little")
                    directory = int.from_bytes(record[40:48], "little")
        if directory > _MAX_HEADER_BYTES or entries > _MAX_HEADER_BYTES // 46:
            raise self.error(f"its zip directory lists {entries:,} entries in {directory:,} bytes; expected at most "
                             f"{_MAX_HEADER_BYTES:,} bytes (a tensormoe archive holds one entry per parameter)")

    @contextlib.contextmanager
    def _archive(self):
        try:
            with zipfile.ZipFile(self.path) as archive:
                yield archive
        except zipfile.BadZipFile as err:
            raise self.error(f"it is not an intact .npz archive: truncated or corrupted ({err})") from None
        except (zipfile.LargeZipFile, EOFError, KeyError, RuntimeError, NotImplementedError, OSError) as err:
            if isinstance(err, (FileNotFoundError, IsADirectoryError, PermissionError)):
                raise
            raise self.error(f"it is truncated or corrupted ({type(err).__name__}: {str(err)[:200]})") from None

    def _npy_header(
        self, archive: zipfile.ZipFile, member: str, header: bool = False
    ) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype from an entry's .npy header, checked against the zip's declared size (nothing else read)."""
        info = archive.getinfo(member)
        if header and info.file_size > _MAX_HEADER_BYTES:
            raise self.error(f"its header entry {member!r} is {info.file_size:,} bytes; expected at most "
                             f"{_MAX_HEADER_BYTES:,}")
        with archive.open(member) as fp:
            try:
                version = np.lib.format.read_magic(fp)
                readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                if version not in readers:
                    raise ValueError(f"unsupported .npy version {version}")
                shape, _, dtype = readers[version](fp)
                start = fp.tell()
            except (ValueError, SyntaxError, TypeError) as err:
                raise self.error(f"entry {member!r} is not a valid .npy array ({str(err)[:200]})") from None
        if dtype.hasobject:
            raise self.error(f"entry {member!r} holds pickled (object) data, which is never loaded")
        if header and (dtype != np.uint8 or len(shape) != 1):
            raise self.error(f"its header has dtype {dtype} and shape {shape}; expected 1-d uint8 JSON")
        if not header and (dtype.kind != "f" or dtype.itemsize not in (2, 4, 8)):
            raise self.error(f"entry {member!r} has dtype {dtype}; expected float16, float32 or float64")
        claimed = start + math.prod(shape) * dtype.itemsize  # Python integers: never wraps around
        if claimed != info.file_size:
            raise self.error(f"entry {member!r} claims shape {shape} of {dtype} ({claimed:,} bytes with its header) "
                             f"but the archive declares {info.file_size:,} bytes")
        return tuple(shape), np.dtype(dtype.name)

    def _parse_header(self, archive: zipfile.ZipFile) -> dict[str, Any]:
        member = _NPZ_HEADER + ".npy"
        self._npy_header(archive, member, header=True)
        with archive.open(member) as fp:
            try:  # its size was checked: reads at most _MAX_HEADER_BYTES
                raw = np.lib.format.read_array(fp, allow_pickle=False)
            except (ValueError, SyntaxError, TypeError, EOFError) as err:
                raise self.error(f"entry {member!r} is not a valid .npy array ({str(err)[:200]})") from None
        header = self._config_from(raw.tobytes(), "its header")
        if header.get("format") != FORMAT:
            raise self.error(f"its header does not name the format {FORMAT!r}")
        if header.get("version") != FORMAT_VERSION:
            raise self.error(f"format version {header.get('version')!r:.40}; this tensormoe reads {FORMAT_VERSION}")
        return header

    def read(self) -> dict[str, np.ndarray]:
        out = {}
        with self._archive() as archive:
            for name in self.shapes:
                with archive.open(name + ".npy") as fp:
                    try:  # the header was checked: this reads exactly the declared bytes
                        out[name] = np.lib.format.read_array(fp, allow_pickle=False)
                    except (ValueError, EOFError, OSError) as err:
                        raise self.error(f"entry {name + '.npy'!r} cannot be read ({str(err)[:200]})") from None
                if out[name].shape != self.shapes[name] or out[name].dtype.name != self.stored_dtypes[name]:
                    raise self.error(f"entry {name + '.npy'!r} changed while it was read")
                out[name] = out[name].astype(out[name].dtype.newbyteorder("="), copy=False)  # big-endian entries
        return out


def _open(path: str | os.PathLike, max_bytes: int | None) -> _File:
    """The checked header of the weights file at ``path``: an .npz archive (a zip) or a safetensors file."""
    path = os.fspath(path)
    with open(path, "rb") as f:  # a missing file is a FileNotFoundError, as for any open()
        magic = f.read(4)
    return (_NpzFile if magic in (b"PK\x03\x04", b"PK\x05\x06") else _SafetensorsFile)(path, max_bytes)


def read_config(path: str | os.PathLike, *, max_bytes: int | None = None) -> dict[str, Any]:
    """The configuration stored in a weights file (its header is checked; no parameter is read).

    Parameters
    ----------
    path : str or os.PathLike
    max_bytes : int, optional
        Most bytes the file's parameters may take (default:
        :func:`tensormoe.validation.memory_limit`).

    Raises
    ------
    ValueError
        If the file is not a valid tensormoe weights file.

    Examples
    --------
    >>> import os, tempfile, tensormoe
    >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
    >>> save(tensormoe.CPMMoE(4, 3, [5, 2], rank=2), path)
    >>> read_config(path)["expert_dims"]
    [5, 2]
    """
    return _open(path, max_bytes).config


def load(layer: Any, path: str | os.PathLike, *, max_bytes: int | None = None) -> Any:
    """Load the parameters saved in ``path`` into ``layer``, in place; return ``layer``.

    The layer keeps its backend, device and dtype (values are cast to it).  The
    file must hold a layer of the same class and configuration (dims, ranks,
    bias, gate); nothing in ``layer`` changes unless the whole file is valid and
    fits.

    Parameters
    ----------
    layer : tensormoe.MMoE, tensormoe.torch module or tensormoe.jax layer
    path : str or os.PathLike
        A safetensors file or an ``.npz`` archive written by :func:`save`.
    max_bytes : int, optional
        Most bytes the file's parameters may take (default:
        :func:`tensormoe.validation.memory_limit`).

    Raises
    ------
    ValueError
        Naming the problem: not a tensormoe file, truncated or corrupted,
        pickled data inside, another factorization or configuration, a
        parameter of the wrong shape or dtype, more bytes than the limit.

    Examples
    --------
    >>> import os, tempfile, numpy as np, tensormoe
    >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
    >>> save(tensormoe.CPMMoE(4, 3, [5], rank=2, seed=1), path)
    >>> layer = load(tensormoe.CPMMoE(4, 3, [5], rank=2, seed=2), path)
    >>> bool(np.array_equal(layer.params["factor_0"], tensormoe.CPMMoE(4, 3, [5], rank=2, seed=1).params["factor_0"]))
    True
    >>> load(tensormoe.CPMMoE(4, 3, [5], rank=3), path)
    Traceback (most recent call last):
    ...
    ValueError: cannot load tensormoe weights from '...': it holds another layer: rank=2 (the layer has 3)
    """
    core, params = _core_and_params(layer)
    file = _open(path, max_bytes)
    file.check_fits(core)
    arrays = file.read()
    if isinstance(layer, MMoE):
        ops = get_ops(backend_of(next(iter(params.values()))))
        # each array on its predecessor's backend, device and dtype
        layer.params = {name: ops.asarray(arrays[name], dtype_name(params[name]), like=params[name]) for name in params}
    else:
        layer._assign_params({name: arrays[name] for name in params})
    _assign_norm_state(layer, core, arrays, next(iter(_core_and_params(layer)[1].values())))
    return layer


def layer_from_file(
    path: str | os.PathLike, backend: str | None = None, dtype: str | None = None, *, max_bytes: int | None = None
) -> MMoE:
    """Rebuild the functional layer stored in ``path``, its parameters on ``backend``.

    Parameters
    ----------
    path : str or os.PathLike
        A safetensors file or an ``.npz`` archive written by :func:`save`.
    backend : str, optional
        Where the parameters go (default: the current backend).
    dtype : str, optional
        Parameter dtype (default: the one saved; a ``bfloat16`` file loads as
        ``float32`` on NumPy, which has no bfloat16 - exactly, as every bfloat16
        value is a float32 value).
    max_bytes : int, optional
        Most bytes the file's parameters may take (default:
        :func:`tensormoe.validation.memory_limit`).  The layer is built only if
        it holds no more parameters than the file stores.

    Returns
    -------
    tensormoe.MMoE
        Wrap it with :func:`tensormoe.torch.wrap` or :func:`tensormoe.jax.wrap`
        for a module or a pytree layer.

    Examples
    --------
    >>> import os, tempfile, tensormoe
    >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
    >>> save(tensormoe.TuckerMMoE(4, 3, [5], ranks=[2, 3, 2]), path)
    >>> layer_from_file(path, backend="numpy")
    TuckerMMoE(in_dim=4, out_dim=3, expert_dims=[5], ranks=[2, 3, 2], bias=True, gate='entmax15')
    """
    file = _open(path, max_bytes)
    dtype = None if dtype is None else _v.check_dtype(dtype)
    with backend_context(backend) if backend is not None else contextlib.nullcontext(get_backend()) as name:
        if dtype is None:
            dtype = file.config["dtype"]
            if dtype == "bfloat16" and name == "numpy":
                dtype = "float32"
        layer = file.build(dtype, max_bytes)
        file.check_fits(layer)
        arrays = file.read()
        layer.params = convert_params({k: v for k, v in arrays.items() if k in layer.param_shapes()}, name, dtype)
        _assign_norm_state(layer, layer, arrays, next(iter(layer.params.values())))
    return layer
