"""Portable weights: save a layer from any backend, load it into any other.

The format is a NumPy ``.npz`` archive (a zip of ``.npy`` files) holding

* ``__tensormoe__.npy`` — a ``uint8`` array of UTF-8 JSON: the format name and
  version, the layer's configuration (:meth:`tensormoe.layer.MMoE.config`) and the
  dtype of every parameter;
* ``<name>.npy`` — one floating-point array per parameter (``factor_0``, ...,
  ``core`` for Tucker, ``gate_0``, ...), stored in its own dtype; ``bfloat16``,
  which NumPy lacks, is stored as ``float32`` (exactly) and cast back on load.

Reading is safe: every member is read with ``allow_pickle=False``, the
configuration is plain JSON, and members other than these are refused, so
loading a file never executes code from it.  A file that is truncated,
corrupted (the zip's CRC checks), holds a pickle, or does not fit the target
(another factorization, configuration or shape) raises a ``ValueError``
that names the problem, before anything in the target layer is changed.

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
>>> path = os.path.join(tempfile.mkdtemp(), "layer.npz")
>>> io.save(layer, path)
>>> copy = io.layer_from_file(path)
>>> x = np.ones((2, 4), dtype="float32")
>>> bool(np.array_equal(copy(x), layer(x)))
True
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from .backend import backend_context, get_backend
from .layer import MMoE, convert_params, layer_from_config
from .ops import get_ops, ops_for_array

__all__ = ["FORMAT", "FORMAT_VERSION", "load", "layer_from_file", "read_config", "save"]

FORMAT = "tensormoe"
"""Name of the format, stored in the header of every file.

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

_HEADER = "__tensormoe__"
# configuration entries that must agree between a file and the layer it is loaded into
# (the rest - seed, init_std, dtype, optimize - do not change what the weights compute)
# (a file written before gate_rank existed has no entry: .get gives None, the full gates it holds)
_MUST_MATCH = (
    "class", "in_dim", "out_dim", "expert_dims", "rank", "ranks", "bias", "gate", "gate_norm", "router", "gate_rank"
)
_FLOAT_KINDS = ("float16", "float32", "float64")
_MAX_HEADER_BYTES = 1 << 20


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


def _to_numpy(value: Any) -> np.ndarray:
    name = ops_for_array(value)
    return get_ops(name).to_numpy(value) if name else np.asarray(value)


def _dtype_name(value: Any) -> str:
    return str(value.dtype).replace("torch.", "")


def save(layer: Any, path: str | os.PathLike) -> None:
    """Write a layer's configuration and parameters to ``path`` (an ``.npz`` archive).

    Parameters
    ----------
    layer : tensormoe.MMoE, tensormoe.torch module or tensormoe.jax layer
        Parameters may live on any backend and device.
    path : str or os.PathLike
        The file to write (no suffix is added).  It is written to a temporary
        file first and then moved into place, so an interrupted save never leaves
        a half-written file at ``path``.

    Examples
    --------
    >>> import os, tempfile, tensormoe
    >>> path = os.path.join(tempfile.mkdtemp(), "w.npz")
    >>> save(tensormoe.TTMMoE(4, 3, [5], ranks=2), path)
    >>> read_config(path)["class"]
    'TTMMoE'
    """
    core, params = _core_and_params(layer)
    config = layer.config() if hasattr(layer, "config") else core.config()
    dtypes = {name: _dtype_name(value) for name, value in params.items()}
    arrays = {name: _to_numpy(value) for name, value in params.items()}
    header = {"format": FORMAT, "version": FORMAT_VERSION, "config": config, "dtypes": dtypes}
    arrays[_HEADER] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tensormoe-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class _File:
    """The validated contents of a weights file: header and (lazily read) arrays."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        try:
            with zipfile.ZipFile(self.path) as archive:
                members = archive.namelist()
                if _HEADER + ".npy" not in members:
                    raise self._error(f"it has no {_HEADER!r} entry (not written by tensormoe.io.save)")
                self.header = self._parse_header(self._read(archive, _HEADER + ".npy", max_bytes=_MAX_HEADER_BYTES))
                expected = {name + ".npy" for name in self.dtypes}
                unexpected = sorted(set(members) - expected - {_HEADER + ".npy"})
                if unexpected:
                    raise self._error(f"it holds unexpected entries {unexpected}")
                missing = sorted(name for name in self.dtypes if name + ".npy" not in members)
                if missing:
                    raise self._error(f"it lacks the parameters {missing} listed in its header")
                self.arrays = {name: self._read(archive, name + ".npy") for name in self.dtypes}
        except ValueError:
            raise
        except FileNotFoundError:
            raise
        except zipfile.BadZipFile as err:
            raise self._error(
                f"it is not an intact .npz archive: truncated, corrupted, or another format such as a pickle ({err})"
            ) from None
        except (zipfile.LargeZipFile, EOFError, OSError, KeyError, RuntimeError) as err:
            raise self._error(f"it is truncated or corrupted ({type(err).__name__}: {err})") from None
        for name, array in self.arrays.items():
            if array.dtype.name not in _FLOAT_KINDS:
                raise self._error(f"parameter {name!r} has dtype {array.dtype}; expected one of {list(_FLOAT_KINDS)}")

    def _error(self, problem: str) -> ValueError:
        return ValueError(f"cannot load tensormoe weights from {self.path!r}: {problem}")

    def _read(self, archive: zipfile.ZipFile, member: str, max_bytes: int | None = None) -> np.ndarray:
        info = archive.getinfo(member)
        if max_bytes is not None and info.file_size > max_bytes:
            raise self._error(f"entry {member!r} is {info.file_size} bytes; expected at most {max_bytes}")
        with archive.open(member) as fp:
            # the .npy header first: refuse object (pickled) data and sizes the entry cannot hold
            # before anything is allocated or read
            try:
                version = np.lib.format.read_magic(fp)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                if version not in read_header:
                    raise ValueError(f"unsupported .npy version {version}")
                shape, _, dtype = read_header[version](fp)
            except ValueError as err:
                raise self._error(f"entry {member!r} is not a valid .npy array ({err})") from None
            if dtype.hasobject:
                raise self._error(f"entry {member!r} holds pickled (object) data, which is never loaded")
            if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > info.file_size:
                raise self._error(
                    f"entry {member!r} claims shape {shape} of {dtype}, more than its {info.file_size} bytes"
                )
            fp.seek(0)
            try:
                return np.lib.format.read_array(fp, allow_pickle=False)
            except ValueError as err:
                raise self._error(f"entry {member!r} is not a valid .npy array ({err})") from None

    def _parse_header(self, raw: np.ndarray) -> dict[str, Any]:
        if raw.dtype != np.uint8 or raw.ndim != 1:
            raise self._error(f"its header has dtype {raw.dtype} and shape {raw.shape}; expected 1-d uint8 JSON")
        try:
            header = json.loads(raw.tobytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self._error(f"its header is not valid JSON ({err})") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise self._error(f"its header does not name the format {FORMAT!r}")
        if header.get("version") != FORMAT_VERSION:
            raise self._error(f"format version {header.get('version')!r}; this tensormoe reads {FORMAT_VERSION}")
        config, dtypes = header.get("config"), header.get("dtypes")
        if not isinstance(config, dict) or not isinstance(dtypes, dict) or not dtypes:
            raise self._error("its header lacks the 'config' or 'dtypes' entries")
        for name, dtype in dtypes.items():
            if not isinstance(name, str) or not name.isidentifier() or dtype not in (*_FLOAT_KINDS, "bfloat16"):
                raise self._error(f"its header lists the parameter {name!r} with dtype {dtype!r}")
        return header

    @property
    def config(self) -> dict[str, Any]:
        return self.header["config"]

    @property
    def dtypes(self) -> dict[str, str]:
        return self.header["dtypes"]

    def check_fits(self, core: MMoE) -> None:
        """Raise unless the file's configuration and shapes fit ``core``."""
        target = core.config()
        diffs = [
            f"{key}={self.config.get(key)!r} (the layer has {target.get(key)!r})"
            for key in _MUST_MATCH
            if self.config.get(key) != target.get(key)
        ]
        if diffs:
            raise self._error("it holds another layer: " + ", ".join(diffs))
        shapes = core.param_shapes()
        if set(self.arrays) != set(shapes):
            raise self._error(f"it holds the parameters {sorted(self.arrays)}; the layer has {sorted(shapes)}")
        for name, shape in shapes.items():
            if self.arrays[name].shape != shape:
                raise self._error(f"parameter {name!r} has shape {self.arrays[name].shape}; the layer expects {shape}")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The configuration stored in a weights file (the whole file is validated).

    Raises
    ------
    ValueError
        If the file is not a valid tensormoe weights file.

    Examples
    --------
    >>> import os, tempfile, tensormoe
    >>> path = os.path.join(tempfile.mkdtemp(), "w.npz")
    >>> save(tensormoe.CPMMoE(4, 3, [5, 2], rank=2), path)
    >>> read_config(path)["expert_dims"]
    [5, 2]
    """
    return _File(path).config


def load(layer: Any, path: str | os.PathLike) -> Any:
    """Load the parameters saved in ``path`` into ``layer``, in place; return ``layer``.

    The layer keeps its backend, device and dtype (values are cast to it).  The
    file must hold a layer of the same class and configuration (dims, ranks,
    bias, gate); nothing in ``layer`` changes unless the whole file is valid and
    fits.

    Parameters
    ----------
    layer : tensormoe.MMoE, tensormoe.torch module or tensormoe.jax layer
    path : str or os.PathLike

    Raises
    ------
    ValueError
        Naming the problem: not a tensormoe file, truncated or corrupted,
        pickled data inside, another factorization or configuration, or a
        parameter of the wrong shape.

    Examples
    --------
    >>> import os, tempfile, numpy as np, tensormoe
    >>> path = os.path.join(tempfile.mkdtemp(), "w.npz")
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
    file = _File(path)
    file.check_fits(core)
    if isinstance(layer, MMoE):
        ops = get_ops(ops_for_array(next(iter(params.values()))))
        # each array on its predecessor's backend, device and dtype
        layer.params = {
            name: ops.asarray(file.arrays[name], _dtype_name(params[name]), like=params[name]) for name in params
        }
    else:
        layer._assign_params(file.arrays)
    return layer


def layer_from_file(path: str | os.PathLike, backend: str | None = None, dtype: str | None = None) -> MMoE:
    """Rebuild the functional layer stored in ``path``, its parameters on ``backend``.

    Parameters
    ----------
    path : str or os.PathLike
    backend : str, optional
        Where the parameters go (default: the current backend).
    dtype : str, optional
        Parameter dtype (default: the one saved; a ``bfloat16`` file loads as
        ``float32`` on NumPy, which has no bfloat16 - exactly, as every bfloat16
        value is a float32 value).

    Returns
    -------
    tensormoe.MMoE
        Wrap it with :func:`tensormoe.torch.wrap` or :func:`tensormoe.jax.wrap`
        for a module or a pytree layer.

    Examples
    --------
    >>> import os, tempfile, tensormoe
    >>> path = os.path.join(tempfile.mkdtemp(), "w.npz")
    >>> save(tensormoe.TuckerMMoE(4, 3, [5], ranks=[2, 3, 2]), path)
    >>> layer_from_file(path, backend="numpy")
    TuckerMMoE(in_dim=4, out_dim=3, expert_dims=[5], ranks=[2, 3, 2], bias=True, gate='entmax15')
    """
    file = _File(path)
    config = dict(file.config)
    with backend_context(backend) if backend is not None else contextlib.nullcontext(get_backend()) as name:
        if dtype is None:
            dtype = config.get("dtype", "float32")
            if dtype == "bfloat16" and name == "numpy":
                dtype = "float32"
        config["dtype"] = dtype
        try:
            layer = layer_from_config(config)
        except (TypeError, ValueError) as err:
            raise file._error(f"its configuration does not build a layer ({err})") from None
        file.check_fits(layer)
        layer.params = convert_params(file.arrays, name, dtype)
    return layer
