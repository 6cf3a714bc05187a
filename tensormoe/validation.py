"""Argument checks shared by every public entry point.

Each check returns the value in canonical form or raises:

* ``TypeError`` when the value is of the wrong *kind*: a float where an integer
  is needed, a list where an array is needed, an integer array where a
  floating-point one is needed, an array of another backend or dtype;
* ``ValueError`` when the kind is right but the value is not: a non-positive
  size, a wrong shape, a rank above its mode size, an unknown name.

Every message names the argument, the value received and what was expected,
so that a wrong call fails at the call, never deep inside TensorLy,
opt_einsum or a framework.

Integers may be Python or NumPy integers (``bool`` is rejected: ``True`` is not
a size); sequences may be lists, tuples, ranges or 1-d NumPy arrays.

Examples
--------
>>> check_positive_int(3, "rank")
3
>>> check_positive_int(0, "rank")
Traceback (most recent call last):
...
ValueError: rank must be a positive integer; got 0
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._array import backend_of, dtype_name, to_numpy

__all__ = [
    "FLOAT_DTYPES",
    "FLOAT_MAX",
    "ITEMSIZE",
    "MAX_BYTES_ENV",
    "MEMORY_FRACTION",
    "check_array",
    "check_bool",
    "check_choice",
    "check_coefficients",
    "check_dtype",
    "check_finite",
    "check_index",
    "check_int_sequence",
    "check_mask",
    "check_memory",
    "check_nonnegative_int",
    "check_params",
    "check_positive_int",
    "check_positive_real",
    "describe",
    "is_int",
    "memory_limit",
]

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
"""The floating-point dtypes layers accept, by name.

Examples
--------
>>> "bfloat16" in FLOAT_DTYPES
True
"""

ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
"""Bytes per element of each dtype in :data:`FLOAT_DTYPES`.

Examples
--------
>>> ITEMSIZE["bfloat16"], ITEMSIZE["float64"]
(2, 8)
"""

FLOAT_MAX = {"float16": 65504.0, "bfloat16": 3.3895e38, "float32": 3.4028e38, "float64": 1.7977e308}
"""Largest finite value of each dtype in :data:`FLOAT_DTYPES` (quoted when a result overflows).

Examples
--------
>>> FLOAT_MAX["float16"]
65504.0
"""

MAX_BYTES_ENV = "TENSORMOE_MAX_BYTES"
"""Environment variable holding the default memory limit of :func:`memory_limit`.

A number of bytes, optionally with a unit: ``"8GiB"``, ``"500 MB"``, ``"1.5TiB"``,
``"1000000"``.

Examples
--------
>>> MAX_BYTES_ENV
'TENSORMOE_MAX_BYTES'
"""

MEMORY_FRACTION = 0.25
"""Default memory limit, as a fraction of the machine's physical memory.

A quarter, because building float32 parameters briefly holds their float64
draws as well (three times the parameters' size), and loading a file holds the
file's arrays and their converted copies.

Examples
--------
>>> MEMORY_FRACTION
0.25
"""

#: How to make an array of each backend, quoted in "not an array" messages.
_CONVERT_HINT = {
    "numpy": "numpy.asarray({arg}, dtype='{dtype}')",
    "pytorch": "torch.as_tensor({arg}, dtype=torch.{dtype})",
    "jax": "jax.numpy.asarray({arg}, dtype='{dtype}')",
}


def describe(value: Any) -> str:
    """A short description of a received value, for error messages.

    Arrays are described by backend, shape and dtype (never by their
    contents); other values by a ``repr`` cut at 60 characters and their type.

    Examples
    --------
    >>> describe(4.5)
    '4.5 of type float'
    >>> import numpy as np
    >>> describe(np.zeros((2, 3), dtype="int64"))
    'a numpy array of shape (2, 3) and dtype int64'
    """
    source = backend_of(value)
    if source is not None:
        return f"a {source} array of shape {tuple(value.shape)} and dtype {dtype_name(value)}"
    text = repr(value)
    if len(text) > 60 or "\n" in text:
        if isinstance(value, (list, tuple, dict, set)):
            return f"a {type(value).__name__} of {len(value)} items"
        text = " ".join(text.split())[:57] + "..."
    return f"{text} of type {type(value).__name__}"


# -- scalars ---------------------------------------------------------------------------
def is_int(value: Any) -> bool:
    """True for Python and NumPy integers, False for ``bool`` and everything else.

    Examples
    --------
    >>> import numpy as np
    >>> is_int(3), is_int(np.int64(3)), is_int(True), is_int(3.0)
    (True, True, False, False)
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_positive_int(value: Any, argument: str) -> int:
    """Return ``value`` as an ``int`` if it is an integer >= 1.

    Raises
    ------
    TypeError
        If ``value`` is not an integer (``bool`` and floats included).
    ValueError
        If ``value`` < 1.

    Examples
    --------
    >>> import numpy as np
    >>> check_positive_int(np.int32(4), "in_dim")
    4
    >>> check_positive_int(4.0, "in_dim")
    Traceback (most recent call last):
    ...
    TypeError: in_dim must be a positive integer; got 4.0 of type float
    """
    if not is_int(value):
        raise TypeError(f"{argument} must be a positive integer; got {describe(value)}")
    if value < 1:
        raise ValueError(f"{argument} must be a positive integer; got {int(value)!r}")
    return int(value)


def check_nonnegative_int(value: Any, argument: str) -> int:
    """Return ``value`` as an ``int`` if it is an integer >= 0.

    Examples
    --------
    >>> check_nonnegative_int(0, "seed")
    0
    >>> check_nonnegative_int(-1, "seed")
    Traceback (most recent call last):
    ...
    ValueError: seed must be a non-negative integer; got -1
    """
    if not is_int(value):
        raise TypeError(f"{argument} must be a non-negative integer; got {describe(value)}")
    if value < 0:
        raise ValueError(f"{argument} must be a non-negative integer; got {int(value)!r}")
    return int(value)


def check_positive_real(value: Any, argument: str, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a ``float`` if it is a finite real number > 0 (>= 0 with ``allow_zero``).

    Examples
    --------
    >>> check_positive_real(0.5, "init_std")
    0.5
    >>> check_positive_real(float("nan"), "init_std")
    Traceback (most recent call last):
    ...
    ValueError: init_std must be a positive finite number; got nan
    """
    what = "a non-negative finite number" if allow_zero else "a positive finite number"
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{argument} must be {what}; got {describe(value)}")
    number = float(value)
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise ValueError(f"{argument} must be {what}; got {number!r}")
    return number


def check_bool(value: Any, argument: str) -> bool:
    """Return ``value`` as a ``bool`` if it is ``True``/``False`` (NumPy booleans too).

    Examples
    --------
    >>> check_bool(1, "bias")
    Traceback (most recent call last):
    ...
    TypeError: bias must be True or False; got 1 of type int
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{argument} must be True or False; got {describe(value)}")
    return bool(value)


def check_choice(value: Any, argument: str, choices: Sequence[Any], what: str = "supported") -> Any:
    """Return the entry of ``choices`` equal to ``value`` (strings compare by value, others by identity).

    ``what`` completes the message ``"{argument}={value!r} is not {what}"``.

    Examples
    --------
    >>> check_choice("softmax", "gate", ["entmax15", "softmax"])
    'softmax'
    >>> check_choice("relu", "gate", ["entmax15", "softmax"], what="a gate activation")
    Traceback (most recent call last):
    ...
    ValueError: gate='relu' is not a gate activation; expected one of ['entmax15', 'softmax']
    """
    for choice in choices:
        if value is choice or (isinstance(value, str) and isinstance(choice, str) and value == choice):
            return choice
    if isinstance(value, str):
        raise ValueError(f"{argument}={value!r} is not {what}; expected one of {list(choices)}")
    raise TypeError(f"{argument} must be one of {list(choices)}; got {describe(value)}")


def check_dtype(value: Any, argument: str = "dtype") -> str:
    """Return the name of a floating-point dtype given by name or by dtype object.

    Accepted: the names in :data:`FLOAT_DTYPES`, NumPy dtypes and scalar types
    (``np.float32``), JAX scalar types (``jnp.bfloat16``) and PyTorch dtypes
    (``torch.float16``).

    Examples
    --------
    >>> import numpy as np
    >>> check_dtype(np.float32)
    'float32'
    >>> check_dtype("int32")
    Traceback (most recent call last):
    ...
    ValueError: dtype='int32' is not supported; expected one of ['float16', 'bfloat16', 'float32', 'float64']
    """
    if isinstance(value, str):
        name = value
    elif isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic)):
        name = np.dtype(value).name
    elif isinstance(getattr(value, "dtype", None), np.dtype) and not hasattr(value, "shape"):
        name = value.dtype.name  # JAX scalar types such as jnp.bfloat16
    elif type(value).__module__ == "torch" and type(value).__name__ == "dtype":
        name = dtype_name(value)
    else:
        raise TypeError(
            f"{argument} must be the name of a floating-point dtype, one of {list(FLOAT_DTYPES)}; "
            f"got {describe(value)}"
        )
    if name not in FLOAT_DTYPES:
        raise ValueError(f"{argument}={value!r} is not supported; expected one of {list(FLOAT_DTYPES)}")
    return name


# -- memory ----------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_BYTES = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?b|b)?\s*", re.IGNORECASE)
#: used when the platform does not report its physical memory (os.sysconf is POSIX-only)
_FALLBACK_MEMORY = 16 * 2**30


def _human(nbytes: int) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{nbytes} B"


def _physical_memory() -> int | None:
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return pages * page_size if pages > 0 and page_size > 0 else None


def _parse_bytes(text: str) -> int | None:
    match = _BYTES.fullmatch(text)
    if match is None:
        return None
    number, unit = match.groups()
    whole, _, fraction = number.partition(".")
    scale = _UNITS[(unit or "").lower()]
    # exact in integers: "1.5GiB" is 3 * 2**29, never a rounded float
    value = (int(whole or "0") * 10 ** len(fraction) + int(fraction or "0")) * scale // 10 ** len(fraction)
    return value if value > 0 else None


def _limit(max_bytes: Any) -> tuple[int, str, bool]:
    """The memory limit in bytes, where it comes from and whether a max_bytes argument may raise it (messages)."""
    if max_bytes is not None:
        return check_positive_int(max_bytes, "max_bytes"), f"the limit max_bytes={int(max_bytes)}", False
    text = os.environ.get(MAX_BYTES_ENV, "").strip()
    if text:
        value = _parse_bytes(text)
        if value is None:
            raise ValueError(
                f"{MAX_BYTES_ENV}={text!r} is not a size; expected a positive number of bytes, optionally with "
                "a unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '8GiB'"
            )
        return value, f"the limit {MAX_BYTES_ENV}={text!r}", True
    memory = _physical_memory()
    if memory is None:
        return _FALLBACK_MEMORY, f"the default limit where physical memory is unknown, {_human(_FALLBACK_MEMORY)}", True
    source = f"the default limit, {MEMORY_FRACTION:g} of {_human(memory)} of physical memory"
    return int(memory * MEMORY_FRACTION), source, True


def memory_limit(max_bytes: int | None = None) -> int:
    """The most bytes a layer's parameters, or the arrays of a weights file, may take.

    Parameters
    ----------
    max_bytes : int, optional
        An explicit limit, returned as it is (after checking it is a positive
        integer).  Otherwise the environment variable :data:`MAX_BYTES_ENV`
        (``TENSORMOE_MAX_BYTES``, e.g. ``"8GiB"``) if set, else
        :data:`MEMORY_FRACTION` of the machine's physical memory (16 GiB where
        the platform does not report it).

    Raises
    ------
    ValueError
        If ``max_bytes`` is not positive or the environment variable is not a size.

    Examples
    --------
    >>> memory_limit(2**20)
    1048576
    >>> import os
    >>> os.environ[MAX_BYTES_ENV] = "1.5 KiB"
    >>> memory_limit()
    1536
    >>> del os.environ[MAX_BYTES_ENV]
    """
    return _limit(max_bytes)[0]


def check_memory(
    shapes: Mapping[str, Sequence[int]], dtype: str | Mapping[str, str], what: str, max_bytes: int | None = None
) -> int:
    """Return the bytes that arrays of ``shapes`` take; raise ``ValueError`` above :func:`memory_limit`.

    Sizes are computed with Python integers (``math.prod``), which never wrap
    around, before anything is allocated.

    Parameters
    ----------
    shapes : mapping of str to sequence of int
        The arrays, by name.
    dtype : str or mapping of str to str
        One dtype name for all (see :data:`ITEMSIZE`), or one per name.
    what : str
        What holds the arrays, to start the message (a layer's ``repr``, a file).
    max_bytes : int, optional
        The limit (default: :func:`memory_limit`).

    Examples
    --------
    >>> check_memory({"factor_0": (1000, 3), "gate_0": (6, 1000)}, "float32", "layer")
    36000
    >>> check_memory({"factor_0": (10**9, 3)}, "float32", "layer", max_bytes=2**30)
    Traceback (most recent call last):
    ...
    ValueError: layer: 3,000,000,000 parameters, 12,000,000,000 bytes (11.2 GiB) in float32; expected at most ...
    """
    limit, source, default = _limit(max_bytes)
    dtypes = {name: dtype for name in shapes} if isinstance(dtype, str) else dict(dtype)
    count = sum(math.prod(int(n) for n in shape) for shape in shapes.values())
    nbytes = sum(math.prod(int(n) for n in shape) * ITEMSIZE[dtypes[name]] for name, shape in shapes.items())
    if nbytes > limit:
        names = sorted(set(dtypes.values()))
        raise ValueError(
            f"{what}: {count:,} parameters, {nbytes:,} bytes ({_human(nbytes)}) in {', '.join(names)}; "
            f"expected at most {limit:,} bytes ({_human(limit)}), {source}"
            + (f" (pass max_bytes=... or set {MAX_BYTES_ENV} to allow more)" if default else "")
        )
    return nbytes


# -- sequences ---------------------------------------------------------------------------
def as_list(value: Any) -> list[Any] | None:
    """``value`` as a list if it is a sequence (not a string) or a NumPy array of rank >= 1, else ``None``.

    Examples
    --------
    >>> import numpy as np
    >>> as_list(np.array([2, 3])), as_list("23"), as_list(3)
    ([2, 3], None, None)
    """
    if isinstance(value, np.ndarray):
        return value.tolist() if value.ndim >= 1 else None
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return list(value)
    return None


def check_int_sequence(value: Any, argument: str, *, what: str = "a sequence of positive integers") -> list[int]:
    """Return ``value`` as a list of ``int`` if it is a sequence of positive integers.

    Examples
    --------
    >>> check_int_sequence((2, 3), "dims")
    [2, 3]
    >>> check_int_sequence([2, 0], "dims")
    Traceback (most recent call last):
    ...
    ValueError: dims[1] must be a positive integer; got 0
    """
    values = as_list(value)
    if values is None:
        raise TypeError(f"{argument} must be {what}; got {describe(value)}")
    return [check_positive_int(v, f"{argument}[{k}]") for k, v in enumerate(values)]


def check_index(index: Any, sizes: Sequence[int], argument: str = "index") -> tuple[int, ...]:
    """Return one expert's index on every level, checked against the level sizes ``sizes``.

    An integer is accepted when there is one level.  Indices count from 0;
    negative indices are not accepted.

    Examples
    --------
    >>> check_index(2, [5])
    (2,)
    >>> check_index((1, 7), [5, 4])
    Traceback (most recent call last):
    ...
    ValueError: index[1]=7 is out of range; expected an integer in [0, 4)
    """
    if is_int(index):
        index = [index]
    values = as_list(index)
    if values is None:
        raise TypeError(
            f"{argument} must be an integer or a sequence of {len(sizes)} integers (one per level); "
            f"got {describe(index)}"
        )
    if len(values) != len(sizes):
        raise ValueError(
            f"{argument} must give one expert per level ({len(sizes)} integers); got {len(values)}: {values!r}"
        )
    out = []
    for h, (n, size) in enumerate(zip(values, sizes)):
        if not is_int(n):
            raise TypeError(f"{argument}[{h}] must be an integer in [0, {size}); got {describe(n)}")
        if not 0 <= n < size:
            raise ValueError(f"{argument}[{h}]={int(n)} is out of range; expected an integer in [0, {size})")
        out.append(int(n))
    return tuple(out)


# -- arrays ---------------------------------------------------------------------------
def check_array(
    x: Any,
    ops: Any,
    argument: str,
    *,
    last: int | None = None,
    dtype: str | None = None,
    device: Any = None,
    explicit: bool = False,
) -> Any:
    """Return ``x`` if it is a floating-point array of the backend of ``ops`` with the expected shape.

    ``explicit`` says the caller named the backend (``backend=...``) rather than
    taking the global flag; the messages then say so.

    Checks, in order: ``x`` is an array (``TypeError``); of the current backend
    (``TypeError``); of rank >= 1 with last axis ``last`` (``ValueError``);
    floating-point (``TypeError``); of dtype ``dtype`` (``TypeError``); on
    ``device`` (``ValueError``, PyTorch only).

    Examples
    --------
    >>> import numpy as np
    >>> from tensormoe.frameworks import get_ops
    >>> check_array(np.ones((2, 4), dtype="int64"), get_ops("numpy"), "x", last=4)
    Traceback (most recent call last):
    ...
    TypeError: x must be a floating-point array; got dtype int64
    """
    source = backend_of(x)
    if explicit and source != ops.name:
        raise TypeError(
            f"{argument} is a {source or type(x).__name__} array but this call computes on {ops.name!r} "
            f"(backend={ops.name!r}); convert it to a {ops.name} array"
        )
    if source is None:
        raise TypeError(
            f"{argument} must be a {ops.name} array (the current backend); got {describe(x)}; "
            f"convert it first, e.g. {_CONVERT_HINT[ops.name].format(arg=argument, dtype=dtype or 'float32')}"
        )
    if source != ops.name:
        raise TypeError(
            f"{argument} is a {source} array; expected a {ops.name} array (the current backend): convert it, "
            f"or switch with tensormoe.set_backend({source!r})"
        )
    shape = tuple(x.shape)
    if last is not None and (len(shape) < 1 or shape[-1] != last):
        raise ValueError(f"{argument} must have shape [..., {last}]; got shape {shape}")
    if last is None and len(shape) < 1:
        raise ValueError(f"{argument} must have at least one axis; got shape {shape}")
    name = dtype_name(x)
    if name not in FLOAT_DTYPES:
        of = f" of dtype {dtype}" if dtype is not None else ""
        raise TypeError(f"{argument} must be a floating-point array{of}; got dtype {name}")
    if dtype is not None and name != dtype:
        raise TypeError(
            f"{argument} has dtype {name}; expected {dtype}, the dtype of the layer's parameters "
            f"(cast {argument}, or build the layer with dtype={name!r})"
        )
    if device is not None:
        here = ops.device(x)
        if here is not None and here != device:
            raise ValueError(
                f"{argument} is on device {here}; expected {device}, the device of the parameters "
                f"(move {argument}, or the parameters)"
            )
    return x


def check_coefficients(
    coefficients: Any,
    expert_dims: Sequence[int],
    batch: tuple[int, ...],
    ops: Any,
    dtype: str,
    device: Any = None,
    explicit: bool = False,
) -> list[Any]:
    """Return the expert coefficients as a list after checking them against ``expert_dims``.

    One array ``[*batch, N_h]`` per level, of the current backend and the layer's
    dtype.  Their *values* are not checked: any real coefficients are accepted
    (the forward pass is linear in each level's coefficients, so zeroing or
    rescaling experts is meaningful); they need not lie on the simplex.

    Examples
    --------
    >>> import numpy as np
    >>> from tensormoe.frameworks import get_ops
    >>> check_coefficients([np.ones((2, 3))], [4], (2,), get_ops("numpy"), "float64")
    Traceback (most recent call last):
    ...
    ValueError: coefficients[0] must have shape [..., 4]; got shape (2, 3)
    """
    levels = as_list(coefficients) if not hasattr(coefficients, "shape") else None
    expected = [[*batch, n] for n in expert_dims]
    if levels is None:
        raise TypeError(
            f"coefficients must be a list of {len(expert_dims)} arrays (one per level, shapes {expected}); "
            f"got {describe(coefficients)}"
            + ("; wrap a single level's array in a list" if hasattr(coefficients, "shape") else "")
        )
    if len(levels) != len(expert_dims):
        raise ValueError(
            f"coefficients must be a list of {len(expert_dims)} arrays (one per level, shapes {expected}); "
            f"got a list of {len(levels)}"
        )
    out = []
    for h, (a, n) in enumerate(zip(levels, expert_dims)):
        check_array(a, ops, f"coefficients[{h}]", last=n, dtype=dtype, device=device, explicit=explicit)
        if tuple(a.shape[:-1]) != tuple(batch):
            raise ValueError(f"coefficients[{h}] must have shape {[*batch, n]} to match x; got {list(a.shape)}")
        out.append(a)
    return out


def check_params(
    params: Any,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    argument: str = "params",
    exact: bool = True,
    dtype: str | None = None,
    backend: str | None = None,
) -> Mapping[str, Any]:
    """Return ``params`` after checking its names, shapes, backend and dtype.

    Parameters
    ----------
    params : mapping of str to array
        The parameters.
    shapes : mapping of str to tuple of int
        Expected name -> shape.
    exact : bool
        Whether names beyond ``shapes`` are an error (else they are ignored).
    dtype : str, optional
        Required dtype of every array (default: any floating-point dtype, the same for all).
    backend : str, optional
        Required backend of every array (default: all the same backend).

    Examples
    --------
    >>> import numpy as np
    >>> check_params({"w": np.ones(3)}, {"w": (2,)})
    Traceback (most recent call last):
    ...
    ValueError: params['w'] has shape (3,); expected (2,)
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"{argument} must be a mapping of names to arrays; got {describe(params)}")
    missing = [k for k in shapes if k not in params]
    extra = [k for k in params if k not in shapes] if exact else []
    if missing or extra:
        parts = []
        if missing:
            parts.append("is missing " + ", ".join(missing))
        if extra:
            parts.append("has unexpected " + ", ".join(map(str, extra)))
        raise ValueError(f"{argument} {' and '.join(parts)} (expected the keys {list(shapes)})")
    first: tuple[str, str] | None = None
    for name, shape in shapes.items():
        value, where = params[name], f"{argument}[{name!r}]"
        source = backend_of(value)
        if source is None:
            raise TypeError(f"{where} must be an array of shape {tuple(shape)}; got {describe(value)}")
        if backend is not None and source != backend:
            raise TypeError(
                f"{where} is a {source} array; expected a {backend} array (the current backend): convert the "
                f"parameters with tensormoe.convert_params({argument}, {backend!r})"
            )
        if first is None:
            first = (name, source)
        elif source != first[1]:
            raise TypeError(
                f"{where} is a {source} array but {argument}[{first[0]!r}] is a {first[1]} array; "
                "expected every parameter on one backend"
            )
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"{where} has shape {tuple(value.shape)}; expected {tuple(shape)}")
        name_dtype = dtype_name(value)
        if dtype is None and name_dtype in FLOAT_DTYPES:
            dtype = name_dtype  # any floating-point dtype, the same for every parameter
        if name_dtype not in FLOAT_DTYPES or (dtype is not None and name_dtype != dtype):
            raise TypeError(
                f"{where} has dtype {name_dtype}; expected "
                + (dtype if dtype is not None else f"a floating-point dtype, one of {list(FLOAT_DTYPES)}")
            )
    return params


def check_mask(mask: Any, ops: Any, lead: tuple[int, ...], like: Any) -> Any:
    """Return ``mask`` as zeros and ones in the dtype of ``like`` after checking it has shape ``lead``.

    A padding mask: true (one) for tokens, false (zero) for padding; a NumPy
    mask is converted to the backend of ``ops``.

    Examples
    --------
    >>> import numpy as np
    >>> from tensormoe.frameworks import get_ops
    >>> check_mask(np.array([True, False]), get_ops("numpy"), (2,), np.ones(1)).tolist()
    [1.0, 0.0]
    >>> check_mask(np.array([2, 0]), get_ops("numpy"), (2,), np.ones(1))
    Traceback (most recent call last):
    ...
    ValueError: mask must hold booleans or zeros and ones; got values [0, 2]
    """
    source = backend_of(mask)
    if source is None:
        raise TypeError(f"mask must be an array of shape {list(lead)} (true for tokens, false for padding); "
                        f"got {describe(mask)}")
    if source not in ("numpy", ops.name):
        raise TypeError(f"mask is a {source} array but the current backend is {ops.name!r}")
    if source != ops.name:
        mask = ops.asarray(mask, like=like)
    if tuple(mask.shape) != lead:
        raise ValueError(f"mask must have shape {list(lead)} (the leading axes of x); got {list(mask.shape)}")
    if not ops.is_tracer(mask):
        values = np.unique(to_numpy(mask))
        if not np.all(np.isin(values, [0, 1])):
            raise ValueError(f"mask must hold booleans or zeros and ones; got values {values[:5].tolist()}")
    return ops.asarray(mask, dtype_name(like), like=like)


def check_finite(x: Any, ops: Any, argument: str) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or infinite values (the opt-in ``check_finite=True`` check).

    Needs concrete values: inside ``jax.jit``/``jax.grad`` tracing it raises
    ``TypeError`` (use ``jax.config.update("jax_debug_nans", True)`` there).

    Examples
    --------
    >>> import numpy as np
    >>> from tensormoe.frameworks import get_ops
    >>> check_finite(np.array([1.0, np.nan, np.inf]), get_ops("numpy"), "x")
    Traceback (most recent call last):
    ...
    ValueError: x holds 2 non-finite values (NaN or Inf) among 3; expected finite values (check_finite=True)
    """
    if ops.is_tracer(x):
        raise TypeError(
            f"check_finite=True needs concrete values, but {argument} is a JAX tracer (inside jax.jit or "
            "jax.grad); build the layer with check_finite=False there and use "
            "jax.config.update('jax_debug_nans', True) instead"
        )
    bad = ops.count_nonfinite(x)
    if bad:
        size = math.prod(tuple(x.shape))
        raise ValueError(
            f"{argument} holds {bad} non-finite value{'s' if bad != 1 else ''} (NaN or Inf) among {size}; "
            "expected finite values (check_finite=True)"
        )
