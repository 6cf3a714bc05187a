"""A layer's parameters: their shapes (from the factorization's network and the routers), drawing, conversion."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .. import validation as _v
from .._array import backend_of, dtype_name, to_numpy
from ..backend import canonical_name, get_backend
from ..frameworks import get_ops
from .config import LayerSpec

__all__ = ["convert_params", "init_params", "param_shapes"]


def convert_params(params: Mapping[str, Any], backend: str | None = None, dtype: str | None = None) -> dict[str, Any]:
    """Copy a parameter dict to another backend (through NumPy).

    Parameters
    ----------
    params : mapping of str to array
        Parameters of any backend.
    backend : str, optional
        Target backend (default: the current one).
    dtype : str, optional
        Target dtype name (default: keep each array's dtype).

    Examples
    --------
    >>> import numpy as np
    >>> out = convert_params({"w": np.ones(2)}, "numpy", "float32")
    >>> out["w"].dtype
    dtype('float32')
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of names to arrays; got {_v.describe(params)}")
    target = get_ops(None if backend is None else canonical_name(backend, "backend"))
    dtype = None if dtype is None else _v.check_dtype(dtype)
    out = {}
    for name, value in params.items():
        array = to_numpy(value)
        if array.dtype.kind not in "fiub":
            raise TypeError(f"params[{name!r}] must be a real numeric array; got {_v.describe(value)}")
        out[name] = target.asarray(array, dtype or dtype_name(value))
    return out


def param_shapes(spec: LayerSpec) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter: the factorization's (from its network), then each level's router's ``{name}_{h}``.

    Examples
    --------
    >>> import tensormoe
    >>> param_shapes(tensormoe.CPMMoE(4, 3, [5], rank=2, router="top1").spec)
    {'factor_0': (5, 2), 'factor_1': (5, 2), 'factor_2': (3, 2), 'gate_0': (4, 5), 'gate_noise_0': (4, 5)}
    """
    shapes = dict(spec.factorization.param_shapes())
    for h, (router, n) in enumerate(zip(spec.routers, spec.expert_dims)):
        for name, shape in router.param_shapes(spec.in_dim, n).items():
            shapes[f"{name}_{h}"] = shape
    return shapes


def init_params(spec: LayerSpec, *, init_std: float, dtype: str, seed: int) -> dict[str, Any]:
    """Parameters drawn in float64 NumPy from ``seed`` and cast to ``dtype`` on the current backend.

    The factors follow :meth:`~tensormoe.network.factorizations.Factorization.init`
    with ``std=init_std``; the routers' parameters
    :meth:`~tensormoe.routing.Router.init`.  One seed gives the same weights on
    every backend.

    Examples
    --------
    >>> import tensormoe
    >>> sorted(init_params(tensormoe.CPMMoE(4, 3, [5], rank=2).spec, init_std=0.5, dtype="float32", seed=0))
    ['factor_0', 'factor_1', 'factor_2', 'gate_0']
    """
    rng = np.random.default_rng(seed)
    raw = spec.factorization.init(rng, init_std)
    for h, (router, n) in enumerate(zip(spec.routers, spec.expert_dims)):
        raw.update({f"{name}_{h}": value for name, value in router.init(spec.in_dim, n, rng).items()})
    ops = get_ops()
    with np.errstate(over="ignore"):  # an overflowing cast is reported just below
        params = {name: ops.asarray(value, dtype) for name, value in raw.items()}
    if not all(ops.count_nonfinite(value) == 0 for value in params.values()):
        raise ValueError(
            f"init_std={init_std!r} gives parameters that overflow {dtype} (largest finite value "
            f"{_v.FLOAT_MAX[dtype]:.4g}); expected a smaller init_std"
        )
    return params


class ParamStore:
    """One set of parameters, with a copy converted to each other backend it is used on (internal)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], dtype: str) -> None:
        self.shapes = dict(shapes)
        self.dtype = dtype
        self.params: dict[str, Any] = {}
        self.backend = ""
        self._converted: dict[str, dict[str, Any]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # copy.deepcopy / pickle: the converted copies hold framework arrays; they refill on use
        return {**self.__dict__, "_converted": {}}

    def copy(self) -> ParamStore:
        """A store of the same parameters whose later assignments do not reach this one."""
        out = ParamStore(self.shapes, self.dtype)
        out.params, out.backend = dict(self.params), self.backend
        return out

    def check(self, params: Any, *, dtype: str | None = None, backend: str | None = None) -> Mapping[str, Any]:
        """``params`` after checking names, shapes, dtype (default: the store's) and backend."""
        return _v.check_params(params, self.shapes, dtype=dtype, backend=backend)

    def set(self, params: Mapping[str, Any]) -> None:
        self.check(params, dtype=self.dtype)
        self.params = dict(params)
        self.backend = backend_of(next(iter(self.params.values()))) or get_backend()
        self._converted = {}

    def on(self, backend: str) -> Mapping[str, Any]:
        """The parameters as arrays of ``backend`` (converted once per backend)."""
        if not self.params:
            raise ValueError(
                "the layer was built with init=False and holds no parameters yet; assign layer.params, "
                "or pass params= to the call"
            )
        if self.backend == backend:
            return self.params
        if backend not in self._converted:
            self._converted[backend] = convert_params(self.params, backend, self.dtype)
        return self._converted[backend]

    def n_params(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values())
