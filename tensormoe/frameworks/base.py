"""The interface of a framework's array code, with what every framework does the same way written once."""

from __future__ import annotations

import math

import numbers
import types
from typing import Any

import numpy as np

from .._array import dtype_name, to_numpy
from . import _kernels

__all__ = ["Ops", "namespace"]


def namespace(module: Any, **overrides: Any) -> types.SimpleNamespace:
    """The public names of an array-API ``module``, with ``overrides`` in place of some of them.

    Examples
    --------
    >>> import array_api_compat.numpy as compat
    >>> xp = namespace(compat, clip=lambda x, /, min=None, max=None: np.clip(x, min, max))
    >>> xp.sum is compat.sum, xp.clip(np.array([-1.0, 2.0]), min=0.0)
    (True, array([0., 2.]))
    """
    return types.SimpleNamespace(**({name: getattr(module, name) for name in module.__all__} | overrides))


class Ops:
    """One framework's array code: its array-API namespace ``xp`` and what no standard spells the same way.

    The gates, routers and layers compute with ``ops.xp`` (the `array API
    <https://data-apis.org/array-api/>`_: ``xp.max(x, axis=-1, keepdims=True)``
    on every framework).  The methods below are the rest: array creation that
    keeps autograd and the device, top-k with the same ties everywhere,
    scatter-add, random draws, a loop that JAX can trace, detecting a trace,
    compiling, and timing a contraction's candidate programs.  The base class
    holds what is written once on ``xp``; each framework's module fills in the
    rest (:mod:`tensormoe.frameworks.numpy`, :mod:`tensormoe.frameworks.torch`,
    :mod:`tensormoe.frameworks.jax`).

    Examples
    --------
    >>> from tensormoe.frameworks import get_ops
    >>> ops = get_ops("numpy")
    >>> ops.name, ops.einsum_backend
    ('numpy', 'numpy')
    >>> ops.xp.max(ops.asarray([[1.0, 3.0]]), axis=-1, keepdims=True)
    array([[3.]])
    """

    #: the backend's name (:data:`tensormoe.backend.BACKENDS`)
    name: str
    #: the ``backend=`` argument opt_einsum expects for this framework
    einsum_backend: str
    #: the framework's array-API namespace
    xp: Any
    #: whether :meth:`sparse_gate` runs the fused C kernel of the sparse gates on this framework's CPU arrays
    fused_gates: bool = False

    # -- arrays ---------------------------------------------------------------------------
    def is_array(self, x: Any) -> bool:
        """Whether ``x`` is an array of this framework.

        Examples
        --------
        >>> import numpy as np
        >>> from tensormoe.frameworks import get_ops
        >>> get_ops("numpy").is_array(np.zeros(2)), get_ops("numpy").is_array([0.0])
        (True, False)
        """
        raise NotImplementedError

    def dtype(self, name: str) -> Any:
        """The framework's dtype object of a dtype name (``"float32"``, ...).

        Examples
        --------
        >>> from tensormoe.frameworks import get_ops
        >>> get_ops("numpy").dtype("float32")
        dtype('float32')
        """
        raise NotImplementedError

    def dtype_name(self, x: Any) -> str:
        """The dtype name of an array, without the framework's prefix.

        Examples
        --------
        >>> import numpy as np
        >>> from tensormoe.frameworks import get_ops
        >>> get_ops("numpy").dtype_name(np.zeros(2, dtype="float32"))
        'float32'
        """
        return dtype_name(x)

    def asarray(self, x: Any, dtype: str | None = None, like: Any = None) -> Any:
        """An array of this framework from ``x`` (any array or nested list).

        ``dtype`` is a dtype name (default: keep ``x``'s); ``like`` is an array whose
        device the result shares.  Never cuts autograd: an array of this framework
        comes back as it is (cast if needed), not copied through TensorLy.

        Examples
        --------
        >>> from tensormoe.frameworks import get_ops
        >>> get_ops("numpy").asarray([1, 2], "float32")
        array([1., 2.], dtype=float32)
        """
        raise NotImplementedError

    def to_numpy(self, x: Any) -> np.ndarray:
        """A NumPy array with the values of ``x``, cut from autograd.

        Examples
        --------
        >>> import numpy as np
        >>> from tensormoe.frameworks import get_ops
        >>> get_ops("numpy").to_numpy(np.ones(2))
        array([1., 1.])
        """
        return to_numpy(x)

    def device(self, x: Any) -> Any:
        """The device ``x`` lives on, to pass as ``device=`` to ``xp``; ``None`` where the framework chooses.

        Examples
        --------
        >>> import numpy as np
        >>> from tensormoe.frameworks import get_ops
        >>> get_ops("numpy").device(np.zeros(1)) is None
        True
        """
        return None

    def concat_ones(self, x: Any) -> Any:
        """``x`` with a column of ones appended on the last axis (the bias input).

        Examples
        --------
        >>> import numpy as np
        >>> from tensormoe.frameworks import get_ops
        >>> get_ops("numpy").concat_ones(np.zeros((1, 2)))
        array([[0., 0., 1.]])
        """
        xp = self.xp
        return xp.concat([x, xp.ones((*x.shape[:-1], 1), dtype=x.dtype, device=self.device(x))], axis=-1)

    def layer_norm(self, x: Any, eps: float) -> Any:
        """``x`` normalised over the last axis to zero mean and unit variance (no affine; fused where it can be).

        Examples
        --------
        >>> import numpy as np
        >>> from tensormoe.frameworks import get_ops
        >>> get_ops("numpy").layer_norm(np.array([[1.0, 3.0]]), 0.0)
        array([[-1.,  1.]])
        """
        xp = self.xp
        centred = x - xp.mean(x, axis=-1, keepdims=True)
        return centred / xp.sqrt(xp.mean(centred * centred, axis=-1, keepdims=True) + eps)

    def gelu(self, x: Any) -> Any:
        """The exact GELU ``x * Phi(x) = x (1 + erf(x / sqrt 2)) / 2`` (``torch.nn.GELU()``, not its tanh form).

        Examples
        --------
        >>> import numpy as np
        >>> from tensormoe.frameworks import get_ops
        >>> get_ops("numpy").gelu(np.array([-1.0, 0.0, 1.0])).round(6).tolist()
        [-0.158655, 0.0, 0.841345]
        """
        # NumPy has no erf: math.erf per entry, in float64, cast back
        erf = np.vectorize(math.erf, otypes=[np.float64])(np.asarray(x, dtype=np.float64) / math.sqrt(2.0))
        return (0.5 * np.asarray(x, dtype=np.float64) * (1.0 + erf)).astype(x.dtype)

    def count_nonfinite(self, x: Any) -> int:
        """Number of NaN and infinite entries of ``x`` (a Python int).

        Examples
        --------
        >>> import numpy as np
        >>> from tensormoe.frameworks import get_ops
        >>> get_ops("numpy").count_nonfinite(np.array([1.0, np.nan, np.inf]))
        2
        """
        return int(self.xp.sum(~self.xp.isfinite(x)))

    # -- selection, gathers and scatters ----------------------------------------------------
    def top_k(self, x: Any, k: int) -> tuple[Any, Any]:
        """The ``k`` largest entries of the last axis, descending, and their indices; ties to the lower index.

        Equal logits (e.g. zero gates) then select the same experts on every framework.

        Examples
        --------
        >>> import numpy as np
        >>> from tensormoe.frameworks import get_ops
        >>> get_ops("numpy").top_k(np.array([[1.0, 3.0, 3.0, 0.0]]), 2)
        (array([[3., 3.]]), array([[1, 2]]))
        """
        raise NotImplementedError

    def gather(self, x: Any, index: tuple[Any, ...]) -> Any:
        """``x[index]``: the leading axes indexed by broadcastable integer arrays.

        Examples
        --------
        >>> import numpy as np
        >>> from tensormoe.frameworks import get_ops
        >>> get_ops("numpy").gather(np.arange(6.0).reshape(3, 2), (np.array([2, 0]),))
        array([[4., 5.],
               [0., 1.]])
        """
        return x[index]

    def scatter_add_last(self, index: Any, values: Any, n: int) -> Any:
        """Zeros ``[..., n]`` with ``values[..., j]`` added at ``index[..., j]`` (duplicates add up).

        Examples
        --------
        >>> import numpy as np
        >>> from tensormoe.frameworks import get_ops
        >>> get_ops("numpy").scatter_add_last(np.array([[2, 0, 2]]), np.array([[1.0, 2.0, 3.0]]), 4)
        array([[2., 0., 4., 0.]])
        """
        raise NotImplementedError

    def normal(self, rng: Any, shape: tuple[int, ...], like: Any) -> tuple[Any, Any]:
        """Standard normal draws of ``shape`` in the dtype of ``like``, and the generator to use next.

        ``rng`` is an integer seed or a ``numpy.random.Generator`` (drawn in NumPy
        in float64 and cast, so every framework gets the same numbers), or on
        PyTorch a ``torch.Generator`` and on JAX a PRNG key (drawn natively).

        Examples
        --------
        >>> import numpy as np
        >>> from tensormoe.frameworks import get_ops
        >>> draw, rng = get_ops("numpy").normal(0, (2,), like=np.zeros(1))
        >>> bool(np.array_equal(draw, np.random.default_rng(0).standard_normal(2)))
        True
        """
        if isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
            rng = np.random.default_rng(int(rng))
        if isinstance(rng, np.random.Generator):
            return self.asarray(rng.standard_normal(shape), dtype_name(like), like=like), rng
        raise TypeError(
            f"rng must be an integer seed or a numpy.random.Generator on the {self.name} backend; "
            f"got {type(rng).__name__}"
        )

    def uniform(self, rng: Any, shape: tuple[int, ...], like: Any) -> tuple[Any, Any]:
        """Uniform draws on ``[0, 1)`` of ``shape`` in the dtype of ``like``, and the generator to use next.

        The twin of :meth:`normal`: an integer seed or a ``numpy.random.Generator``
        draws in NumPy in float64 (the same numbers on every framework), a
        ``torch.Generator`` or a JAX PRNG key draws natively.

        Examples
        --------
        >>> import numpy as np
        >>> from tensormoe.frameworks import get_ops
        >>> draw, rng = get_ops("numpy").uniform(0, (3,), like=np.zeros(1))
        >>> bool(np.array_equal(draw, np.random.default_rng(0).random(3))), bool(((0 <= draw) & (draw < 1)).all())
        (True, True)
        """
        if isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
            rng = np.random.default_rng(int(rng))
        if isinstance(rng, np.random.Generator):
            return self.asarray(rng.random(shape), dtype_name(like), like=like), rng
        raise TypeError(
            f"rng must be an integer seed or a numpy.random.Generator on the {self.name} backend; "
            f"got {type(rng).__name__}"
        )

    def kernel_misfit(self, z: Any) -> str | None:
        """Why the fused C kernel of the sparse gates cannot run on the logits ``z``; ``None`` when it can.

        Examples
        --------
        >>> import numpy as np
        >>> from tensormoe.frameworks import get_ops
        >>> get_ops("numpy").kernel_misfit(np.zeros((2, 3), dtype="float16"))
        'it computes in float32 or float64 (half precision is cast to float32 first); z is float16'
        """
        if not self.fused_gates:
            return f"it runs on NumPy and PyTorch arrays, not on the {self.name} backend"
        if _kernels.KERNEL is None:
            return ("the extension tensormoe.frameworks._sparse_gates is not built (reinstall tensormoe where a C "
                    "compiler is found)")
        if getattr(self.device(z), "type", "cpu") != "cpu":
            return f"it runs on the CPU; z is on {self.device(z)}"
        dtype = dtype_name(z)
        if dtype not in _kernels.DTYPES:
            return f"it computes in float32 or float64 (half precision is cast to float32 first); z is {dtype}"
        return None

    def sparse_gate(self, z: Any, gate: str) -> Any:
        """``gate`` (``"entmax15"`` or ``"sparsemax"``) of float32 or float64 CPU logits by the fused C kernel.

        Where ``fused_gates`` holds and the extension is built (see
        :data:`tensormoe.routing.gates.KERNEL_AVAILABLE`); :mod:`tensormoe.routing.gates` decides when.

        Examples
        --------
        >>> import numpy as np
        >>> from tensormoe.frameworks import get_ops
        >>> from tensormoe.routing.gates import KERNEL_AVAILABLE
        >>> not KERNEL_AVAILABLE or get_ops("numpy").sparse_gate(np.array([[0.5, 0.0, -3.0]]), "sparsemax").tolist()
        [[0.75, 0.25, 0.0]]
        """
        raise NotImplementedError(f"the fused gate kernel does not run on the {self.name} backend")

    # -- autograd, loops and traces -----------------------------------------------------------
    def stop_gradient(self, x: Any) -> Any:
        """``x`` cut from autograd: the same values, no gradient flows back through them.

        Examples
        --------
        >>> import numpy as np
        >>> from tensormoe.frameworks import get_ops
        >>> get_ops("numpy").stop_gradient(np.ones(2))
        array([1., 1.])
        """
        return x

    def while_loop(self, cond: Any, body: Any, state: Any, max_iterations: int) -> tuple[Any, Any]:
        """Apply ``state = body(state)`` while ``cond(state)`` holds, at most ``max_iterations`` times.

        Returns the final state and the number of iterations run.  ``cond`` returns a
        scalar boolean array; eager frameworks run a Python loop, JAX runs
        ``jax.lax.while_loop`` (traceable under ``jax.jit``, not reverse-differentiable:
        stop the gradient of its inputs).

        Examples
        --------
        >>> from tensormoe.frameworks import get_ops
        >>> get_ops("numpy").while_loop(lambda s: s < 10, lambda s: 2 * s, 1, 100)
        (16, 4)
        """
        count = 0
        while count < max_iterations and bool(cond(state)):
            state = body(state)
            count += 1
        return state, count

    def is_tracer(self, x: Any) -> bool:
        """Whether ``x`` is an abstract value being traced (JAX under ``jit``/``grad``), without values to inspect.

        Examples
        --------
        >>> import numpy as np
        >>> from tensormoe.frameworks import get_ops
        >>> get_ops("numpy").is_tracer(np.zeros(1))
        False
        """
        return False

    def is_compiling(self) -> bool:
        """Whether the call is being traced into a graph that a data-dependent Python loop would break.

        True only under ``torch.compile``; ``jax.jit`` traces :meth:`while_loop` natively.

        Examples
        --------
        >>> from tensormoe.frameworks import get_ops
        >>> get_ops("numpy").is_compiling()
        False
        """
        return False

    def compile(self, fn: Any) -> Any:
        """``fn`` compiled for this framework (``jax.jit`` on JAX; ``fn`` itself elsewhere).

        Examples
        --------
        >>> from tensormoe.frameworks import get_ops
        >>> get_ops("numpy").compile(len) is len
        True
        """
        return fn

    def tune(self, plan: Any, operands: list[Any]) -> None:
        """Time the candidate programs of a contraction plan once, on stand-ins of ``operands``.

        Examples
        --------
        >>> import numpy as np
        >>> from tensormoe.contraction import get_plan
        >>> from tensormoe.frameworks import get_ops
        >>> plan = get_plan("bi,io->bo", (2, 3), (3, 4))
        >>> get_ops("numpy").tune(plan, [np.ones((2, 3)), np.ones((3, 4))]); plan.tuned
        True
        """
        plan.tune(*plan.stand_ins(operands, self._zeros), backend=self.einsum_backend)

    def _zeros(self, shape: tuple[int, ...], like: Any) -> Any:
        return self.xp.zeros(shape, dtype=like.dtype, device=self.device(like))
