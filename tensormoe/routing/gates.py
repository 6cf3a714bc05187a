"""Gate activations: expert coefficients from logits, written once for every backend.

Each activation maps logits ``z[..., N]`` to coefficients on the probability
simplex (non-negative, summing to one over the last axis):

* :func:`softmax` — dense, ``exp(z) / sum(exp(z))``;
* :func:`entmax15` — 1.5-entmax (Peters, Niculae & Martins 2019), sparse, the
  reference MMoE's default;
* :func:`sparsemax` — Euclidean projection onto the simplex (Martins & Astudillo 2016).

The two sparse gates find their exact threshold ``tau`` by one of three methods
(``method=``, see :data:`METHODS`): ``"kernel"`` runs a fused C kernel on NumPy
and PyTorch CPU arrays, a few passes over each row while it sits in the cache
(the optional extension ``tensormoe.frameworks._sparse_gates``, built when tensormoe is
installed with a C compiler at hand; on PyTorch a custom operator with the
closed-form backward, which ``torch.compile(fullgraph=True)`` keeps in its
graph); ``"sort"`` sorts the logits and scans their cumulative sums;
``"newton"`` never sorts.  Both activations are ``p = relu(z' -
tau)**(1/(alpha-1))`` with ``g(t) = sum relu(z' - t)**(1/(alpha-1)) - 1``
convex and decreasing until it reaches ``-1``, and ``tau`` its root.  Newton's
method started left of the root, at ``max z' - 1``, climbs to it monotonically
without overshooting; each step needs only elementwise operations and row sums.
After each step the threshold is solved in closed form on the current support
``S = {z' > t}``; when that threshold is consistent with ``S`` it is the exact
root, and the search stops.  For sparsemax this is Michelot's (1986) algorithm
and stops after at most ``N`` steps; for 1.5-entmax it stops once ``t`` passes
the largest logit outside the support (quadratic convergence).  The search runs
without gradient tracking; ``tau`` is then computed differentiably in closed
form from the support found, so values and gradients equal the sort method's up
to rounding.  The kernel runs the same search: up to three Newton (Michelot)
steps over the whole row give a lower bound on ``tau``, the logits above it are
copied aside, and the search finishes on those in float64; it checks the
support it finds and falls back to every logit above ``max z' - 1`` if the
bound overshot, so its result is exact too.  Its backward is the closed-form
Jacobian-vector product (Peters et al. 2019): with ``s = p**(2-alpha)``,
``dz = s * dy - s * sum(s * dy) / sum(s)``.

``"auto"`` (the default) picks the fastest exact method available, as measured
on CPU (float32, ``python benchmarks/run.py --sections gates``): ``"kernel"``
on NumPy and PyTorch CPU arrays when the extension is built (2 to 3 times a
softmax on 64 rows of 1024 experts, against 50 to 80 times for the array methods
in eager PyTorch); ``"newton"`` on JAX, where XLA's sort is slow and the search
runs as one ``jax.lax.while_loop`` (4 to 18 times faster than sorting under
``jax.jit`` at 256 and 1024 experts).  Without the extension: ``"sort"`` on
NumPy (its sort is fast), and on PyTorch's CPU ``"sort"`` for small logit
arrays and ``"newton"`` from ``2**16`` logits in all (entmax15) or ``2**18``
(sparsemax), where sorting long rows costs more.  On a GPU, PyTorch uses
``"sort"`` (every Newton step would wait for the host).  Under
``torch.compile`` the kernel (a custom operator) stays in the graph; the other
methods run as ``"sort"``: the search's data-dependent loop would break the
graph.

All three subtract the row maximum first, so large logits neither overflow nor
lose the support.  :func:`layer_norm` is the optional normalisation of the
logits before the activation (LayerNorm without affine parameters).

Non-finite logits: a logit of ``-inf`` gives its expert a coefficient of exactly
zero (a mask), as long as the row has a finite logit; a row holding ``NaN`` or
``+inf``, or only ``-inf``, gives a row of ``NaN`` coefficients.  Rows never
affect each other.

Precision: half-precision logits (``float16``, ``bfloat16``) are normalised and
activated in ``float32`` and the result is cast back, as MoE routers commonly do
(the Switch Transformer's "selective precision"): sums over many experts and the
squares in :func:`layer_norm` neither lose the simplex nor overflow ``float16``.
The result always has the dtype of the logits.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from .._array import dtype_name
from ..frameworks import Ops, get_ops, kernel_built
from ..validation import check_array, check_positive_real, describe

__all__ = ["ACTIVATIONS", "KERNEL_AVAILABLE", "METHODS", "NORMS", "entmax15", "layer_norm", "sparsemax", "softmax"]

METHODS = ("auto", "kernel", "sort", "newton")
"""Threshold methods of the sparse gates (:func:`entmax15`, :func:`sparsemax`): their ``method=`` values.

``"kernel"`` runs the fused C kernel (NumPy and PyTorch CPU arrays, when the
extension is built: see :data:`KERNEL_AVAILABLE`); ``"sort"`` sorts the logits;
``"newton"`` finds the support by Newton steps without sorting (exact, see the
module notes); ``"auto"`` picks the fastest available (see the module notes).
Under ``torch.compile`` ``"sort"`` and ``"newton"`` run as ``"sort"``.

Examples
--------
>>> METHODS
('auto', 'kernel', 'sort', 'newton')
"""

KERNEL_AVAILABLE = kernel_built()
"""Whether the fused C kernel of the sparse gates (``method="kernel"``) is built.

It is compiled when tensormoe is installed (``pip install``) where a C compiler
is found; without it the gates use their array methods, with the same results.

Examples
--------
>>> isinstance(KERNEL_AVAILABLE, bool)
True
"""

#: Cap on Newton steps for 1.5-entmax (a safeguard: quadratic convergence needs far fewer)
_MAX_NEWTON_STEPS = 100


def _checked_ops(z: Any, ops: Any) -> Ops:
    """The ops to use for logits ``z``, after checking ``z`` (an array of at least one expert)."""
    if ops is None:
        ops = get_ops()
    elif not isinstance(ops, Ops):
        raise TypeError(f"ops must be a tensormoe.ops.Ops (from get_ops()) or None; got {describe(ops)}")
    check_array(z, ops, "z")
    if z.shape[-1] < 1:
        raise ValueError(f"z must have at least one entry (expert) on its last axis; got shape {tuple(z.shape)}")
    return ops


def _checked_method(method: Any) -> str:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method={method!r} is not a threshold method; expected one of {list(METHODS)}")
    return method


#: ``"auto"`` on PyTorch's CPU without the kernel: the fewest logits (all rows) from which ``"newton"`` runs
#: faster than ``"sort"`` (measured side by side, float32: ``python benchmarks/run.py --sections gates``)
_NEWTON_FROM = {"entmax15": 2**16, "sparsemax": 2**18}


def _resolved_method(method: str, ops: Ops, z: Any = None, gate: str = "entmax15") -> str:
    """The method to run for ``method`` on ``z`` (see the module notes)."""
    if method == "kernel":
        why = None if z is None else ops.kernel_misfit(z)
        if why is not None:
            raise ValueError(f"method='kernel' cannot run here: {why}; use method='auto', 'sort' or 'newton'")
        return "kernel"
    kernel = z is not None and ops.kernel_misfit(z) is None
    if ops.is_compiling():
        return "kernel" if method == "auto" and kernel else "sort"
    if method != "auto":
        return method
    if kernel:
        return "kernel"
    if ops.name == "jax":
        return "newton"
    if ops.name == "numpy" or z is None or getattr(ops.device(z), "type", "cpu") != "cpu":
        return "sort"  # NumPy sorts fast; on a GPU each Newton step would wait for the host
    return "newton" if math.prod(z.shape) >= _NEWTON_FROM[gate] else "sort"


def _run(body: Any, z: Any, ops: Any, *args: Any) -> Any:
    """``body(z, ops, *args)`` after checking ``z``; half precision runs in float32 and is cast back."""
    ops = _checked_ops(z, ops)
    if dtype_name(z) in ("float16", "bfloat16"):
        xp = ops.xp
        return xp.astype(body(xp.astype(z, xp.float32), ops, *args), z.dtype)
    return body(z, ops, *args)


def activate(name: str, z: Any, ops: Ops) -> Any:
    """The activation ``name`` of logits the caller has checked (the routers' per-call path), method ``"auto"``."""
    if dtype_name(z) in ("float16", "bfloat16"):
        xp = ops.xp
        return xp.astype(activate(name, xp.astype(z, xp.float32), ops), z.dtype)
    if name == "softmax":
        return _softmax(z, ops)
    return _sparse_gate(z, ops, "auto", name)


def normalise(norm: str | None, z: Any, ops: Ops) -> Any:
    """The normalisation ``norm`` (a key of :data:`NORMS`) of checked logits, with the default ``eps``."""
    if norm is None:
        return z
    if dtype_name(z) in ("float16", "bfloat16"):
        xp = ops.xp
        return xp.astype(ops.layer_norm(xp.astype(z, xp.float32), _EPS), z.dtype)
    return ops.layer_norm(z, _EPS)


def softmax(z: Any, ops: Ops | None = None) -> Any:
    """Softmax over the last axis.

    Parameters
    ----------
    z : array ``[..., N]``
        Floating-point logits of the current backend (or of ``ops``), ``N >= 1``.
    ops : Ops, optional
        The backend's operations (default: the current backend's).

    Examples
    --------
    >>> import numpy as np
    >>> softmax(np.array([0.0, 0.0])).tolist()
    [0.5, 0.5]
    """
    return _run(_softmax, z, ops)


def _softmax(z: Any, ops: Ops) -> Any:
    xp = ops.xp
    e = xp.exp(z - xp.max(z, axis=-1, keepdims=True))
    return e / xp.sum(e, axis=-1, keepdims=True)


def _shifted(z: Any, ops: Ops, scale: float) -> Any:
    """``scale * (z - max z)`` clipped below at -2.

    For sparsemax and 1.5-entmax the threshold satisfies ``tau >= max - 1``, so
    entries below ``-1`` are never in the support; clipping them at ``-2`` leaves
    the result unchanged and keeps the squares and cumulative sums below finite
    for any logits (no ``inf - inf``).
    """
    xp = ops.xp
    return xp.clip((z - xp.max(z, axis=-1, keepdims=True)) * scale, min=-2.0)


def _sorted_support(z: Any, ops: Ops) -> tuple[Any, Any]:
    """Logits sorted in descending order and the ranks ``1..N`` in their dtype."""
    xp = ops.xp
    ranks = xp.arange(1, z.shape[-1] + 1, dtype=z.dtype, device=ops.device(z))
    return xp.sort(z, axis=-1, descending=True, stable=False), ranks


def _support_size(condition: Any, ops: Ops) -> Any:
    """How many sorted entries are in the support, at least one (a NaN row has none; its result stays NaN)."""
    xp = ops.xp
    return xp.clip(xp.sum(condition, axis=-1, keepdims=True), min=1)


def _nan_if_any_nan(tau: Any, z: Any, ops: Ops) -> Any:
    """``tau``, made NaN on rows where the shifted logits ``z`` hold a NaN (else exactly unchanged).

    After the shift a row holds NaN exactly when its logits held NaN or ``+inf``;
    sorting moves those NaNs aside, which would leave the other entries finite
    but meaningless.  ``0 * sum(z)`` is 0 on finite rows (``z`` is clipped below)
    and NaN otherwise, so such rows come out entirely NaN, as documented.
    """
    return tau + 0 * ops.xp.sum(z, axis=-1, keepdims=True)


def entmax15(z: Any, ops: Ops | None = None, method: str = "auto") -> Any:
    """1.5-entmax over the last axis: ``p = relu(z/2 - tau)**2`` with ``sum(p) = 1``.

    The threshold ``tau`` is exact; coefficients of experts below it are exactly
    zero.

    Parameters
    ----------
    z : array ``[..., N]``
        Floating-point logits of the current backend (or of ``ops``), ``N >= 1``.
    ops : Ops, optional
        The backend's operations (default: the current backend's).
    method : {"auto", "kernel", "sort", "newton"}
        How the threshold is found (see :data:`METHODS`): ``"kernel"`` runs
        the fused C kernel; ``"sort"`` sorts the logits; ``"newton"`` does not;
        ``"auto"`` picks the fastest available.  All give the same values and
        gradients up to rounding.

    Examples
    --------
    >>> import numpy as np
    >>> entmax15(np.array([0.0, 0.0])).round(6).tolist()
    [0.5, 0.5]
    >>> entmax15(np.array([10.0, 0.0])).round(6).tolist()
    [1.0, 0.0]
    >>> z = np.array([1.0, 0.8, -2.0])
    >>> bool(np.allclose(entmax15(z, method="sort"), entmax15(z, method="newton")))
    True
    """
    method = _checked_method(method)
    return _run(_sparse_gate, z, ops, method, "entmax15")


def _sparse_gate(z: Any, ops: Ops, method: str, gate: str) -> Any:
    """``gate`` ("entmax15" or "sparsemax") of ``z`` by the threshold method ``method`` resolves to."""
    resolved = _resolved_method(method, ops, z, gate)
    if resolved == "kernel":
        return ops.sparse_gate(z, gate)
    if resolved == "newton":
        return _jitted_on_jax(_NEWTON[gate], z, ops)
    return _SORT[gate](z, ops)


def _entmax15_sort(z: Any, ops: Ops) -> Any:
    xp = ops.xp
    z = _shifted(z, ops, 0.5)
    zs, k = _sorted_support(z, ops)
    mean = xp.cumulative_sum(zs, axis=-1) / k
    mean_sq = xp.cumulative_sum(zs * zs, axis=-1) / k
    ss = k * (mean_sq - mean * mean)
    delta = (1 - ss) / k
    # sqrt(relu(delta)), with a finite gradient where delta <= 0: those entries are never
    # the threshold, but a plain sqrt would send 0 * inf = NaN back through them on JAX
    positive = delta > 0
    tau = mean - xp.where(positive, xp.sqrt(xp.where(positive, delta, 1.0)), 0.0)
    support = _support_size(tau <= zs, ops)
    tau_star = _nan_if_any_nan(xp.take_along_axis(tau, support - 1, axis=-1), z, ops)
    p = xp.clip(z - tau_star, min=0.0)
    return p * p


def _entmax15_step(z: Any, t: Any, ops: Ops, member: Any = None) -> tuple[Any, ...]:
    """On the support ``S = {z > t}``: the closed-form threshold ``t + u`` and what the search needs.

    With ``d = relu(z - t)`` (positive exactly on ``S``), ``s1 = sum d``,
    ``s2 = sum d**2`` and ``k = |S|``, the threshold of ``S`` is ``t + u`` where
    ``u`` is the smaller root of ``k u**2 - 2 s1 u + s2 - 1 = 0``, written
    ``u = (s2 - 1) / (s1 + sqrt(D))``, ``D = s1**2 - k (s2 - 1)`` (no
    cancellation).  Returns ``u``, ``d``, ``k``, whether ``D >= 0`` and
    ``s2 - 1``, ``s1`` (the Newton step on ``g(t) = sum relu(z - t)**2 - 1`` is
    ``(s2 - 1) / (2 s1)``).  Rows without any member (NaN rows) give ``u = 0``.
    Given ``member`` (the support, for any shift ``t``: the formula holds for
    every shift once ``S`` is fixed), the result is differentiable in ``z``: ``d``
    is masked by multiplying with the mask, not by ``relu``, whose gradient at a
    tie is 1/2 on JAX and 1 on PyTorch.  Without it (the search) ``S = {z > t}``.
    """
    xp = ops.xp
    if member is None:  # the search: no gradient, relu is the cheapest mask (np.where is slow)
        d = xp.maximum(z - t, 0)
        k = xp.astype(xp.sum(d > 0, axis=-1, keepdims=True), z.dtype)
    else:
        d = (z - t) * xp.astype(member, z.dtype)
        k = xp.astype(xp.sum(member, axis=-1, keepdims=True), z.dtype)
    s1, s2 = xp.sum(d, axis=-1, keepdims=True), xp.sum(d * d, axis=-1, keepdims=True)
    excess = s2 - 1
    disc = s1 * s1 - k * excess
    real = disc >= 0
    # a finite sqrt (and gradient) where D < 0 or S is empty: such rows are never consistent
    denom = s1 + xp.sqrt(xp.where(real, disc, 1.0))
    nonempty = k > 0
    u = xp.where(nonempty, excess / xp.where(nonempty, denom, 1.0), 0.0)
    return u, d, k, real, excess, s1


def _entmax15_threshold_search(z: Any, ops: Ops) -> tuple[Any, Any]:
    """The left end ``t`` of the exact support's piece, found by Newton steps; and the step count.

    ``z`` are the shifted logits (row maximum 0, so ``t = -1`` starts left of
    the root, where ``g >= 0``).  Each row stops once the closed-form threshold
    ``t + u`` of ``S = {z > t}`` is consistent: no member below it (``count(d >=
    u) == k`` for ``u > 0``; non-members lie at or below ``t <= t + u``), so
    ``g(t + u) = 0`` exactly; or when a step no longer increases ``t``
    (converged to rounding, or a row without members).  No gradient flows
    through ``t``.
    """
    xp = ops.xp
    z = ops.stop_gradient(z)

    def body(state: Any) -> Any:
        t, done = state
        u, d, k, real, excess, s1 = _entmax15_step(z, t, ops)
        exact = real & ((u <= 0) | (xp.astype(xp.sum(d >= u, axis=-1, keepdims=True), z.dtype) == k))
        step = excess / xp.where(s1 > 0, 2 * s1, 1.0)
        stalled = ~(t + step > t) | ~(k > 0)
        finished = done | exact | stalled
        return xp.where(finished, t, t + step), finished

    t0 = xp.max(z, axis=-1, keepdims=True) * 0 - 1.0
    (t, _), steps = ops.while_loop(lambda s: xp.any(~s[1]), body, (t0, t0 > 0), _MAX_NEWTON_STEPS)
    return t, steps


def _entmax15_newton(z: Any, ops: Ops) -> Any:
    z = _shifted(z, ops, 0.5)
    t, _ = _entmax15_threshold_search(z, ops)
    # the support is {z > t}; its threshold is solved once more, shifted by the threshold
    # itself (then d = z - shift is small and D free of cancellation, however far t was)
    member = z > t
    shift = ops.stop_gradient(t + _entmax15_step(z, t, ops, member)[0])
    tau = _nan_if_any_nan(shift + _entmax15_step(z, shift, ops, member)[0], z, ops)
    p = ops.xp.clip(z - tau, min=0.0)
    return p * p


def sparsemax(z: Any, ops: Ops | None = None, method: str = "auto") -> Any:
    """Sparsemax over the last axis: the Euclidean projection of ``z`` onto the simplex.

    Parameters
    ----------
    z : array ``[..., N]``
        Floating-point logits of the current backend (or of ``ops``), ``N >= 1``.
    ops : Ops, optional
        The backend's operations (default: the current backend's).
    method : {"auto", "kernel", "sort", "newton"}
        How the threshold is found (see :data:`METHODS`); all give the same values
        and gradients up to rounding.

    Examples
    --------
    >>> import numpy as np
    >>> sparsemax(np.array([0.5, 0.0, -3.0])).tolist()
    [0.75, 0.25, 0.0]
    >>> sparsemax(np.array([0.5, 0.0, -3.0]), method="sort").tolist()
    [0.75, 0.25, 0.0]
    """
    method = _checked_method(method)
    return _run(_sparse_gate, z, ops, method, "sparsemax")


def _sparsemax_sort(z: Any, ops: Ops) -> Any:
    xp = ops.xp
    z = _shifted(z, ops, 1.0)
    zs, k = _sorted_support(z, ops)
    cs = xp.cumulative_sum(zs, axis=-1)
    support = _support_size(1 + k * zs > cs, ops)
    # divide by the support size in z's dtype (an integer count would promote
    # float32 to float64 on NumPy)
    tau = (xp.take_along_axis(cs, support - 1, axis=-1) - 1) / xp.astype(support, z.dtype)
    return xp.clip(z - _nan_if_any_nan(tau, z, ops), min=0.0)


def _sparsemax_step(z: Any, t: Any, ops: Ops) -> tuple[Any, Any]:
    """The closed-form threshold ``t + (sum_S (z - t) - 1) / |S|`` of ``S = {z > t}``, and ``|S|``.

    Differentiable in ``z`` for a fixed ``t``; a row without members keeps ``t - 1``.
    """
    xp = ops.xp
    member = z > t
    k = xp.astype(xp.sum(member, axis=-1, keepdims=True), z.dtype)
    # masked by a product, not where (slow on NumPy) or relu (wrong gradient at ties)
    s1 = xp.sum((z - t) * xp.astype(member, z.dtype), axis=-1, keepdims=True)
    return t + (s1 - 1) / xp.clip(k, min=1.0), k


def _sparsemax_threshold_search(z: Any, ops: Ops) -> tuple[Any, Any]:
    """Michelot's iteration: ``t`` whose support ``{z > t}`` gives the exact threshold; and the step count.

    From ``t = -1`` (left of the root: the row maximum is 0) each step replaces
    ``t`` by the closed-form threshold of ``{z > t}``; ``t`` increases and the
    support shrinks until it stops changing, after at most ``N`` steps.  A row
    stops when its support did not shrink (the previous ``t`` is kept, so its
    support is the consistent one).  No gradient flows through ``t``.
    """
    xp = ops.xp
    z = ops.stop_gradient(z)

    def body(state: Any) -> Any:
        t, size, done = state
        tau, k = _sparsemax_step(z, t, ops)
        finished = done | ~(k < size)
        return xp.where(finished, t, tau), xp.where(finished, size, k), finished

    t0 = xp.max(z, axis=-1, keepdims=True) * 0 - 1.0
    size0 = t0 * 0 + (z.shape[-1] + 1)
    state, steps = ops.while_loop(lambda s: xp.any(~s[2]), body, (t0, size0, t0 > 0), z.shape[-1] + 2)
    return state[0], steps


def _sparsemax_newton(z: Any, ops: Ops) -> Any:
    z = _shifted(z, ops, 1.0)
    t, _ = _sparsemax_threshold_search(z, ops)
    tau = _sparsemax_step(z, t, ops)[0]
    return ops.xp.clip(z - _nan_if_any_nan(tau, z, ops), min=0.0)


_JITTED: dict[Any, Any] = {}


def _jitted_on_jax(fn: Any, z: Any, ops: Ops) -> Any:
    """``fn(z, ops)``; on JAX through one cached ``jax.jit`` per ``fn`` (eager, or nested in ``grad``/``jit``).

    Eager JAX would re-trace the search's ``while_loop`` and dispatch every
    small operation on each call; a jitted gate is compiled once per shape, is
    differentiable (the loop only sees ``stop_gradient`` values) and nests
    inside an outer ``jax.jit``.
    """
    if ops.name != "jax":
        return fn(z, ops)
    jitted = _JITTED.get(fn)
    if jitted is None:
        jitted = _JITTED[fn] = ops.compile(functools.partial(fn, ops=ops))
    return jitted(z)


def layer_norm(z: Any, eps: float = 1e-5, ops: Ops | None = None) -> Any:
    """Normalise the last axis to zero mean and unit variance (LayerNorm without affine).

    Examples
    --------
    >>> import numpy as np
    >>> [round(v, 3) for v in layer_norm(np.array([1.0, 3.0])).tolist()]
    [-1.0, 1.0]
    """
    return _run(_layer_norm, z, ops, check_positive_real(eps, "eps", allow_zero=True))


def _layer_norm(z: Any, ops: Ops, eps: float) -> Any:
    return ops.layer_norm(z, eps)


_EPS = layer_norm.__defaults__[0]  # the normalisation the routers apply: layer_norm's default


_SORT = {"entmax15": _entmax15_sort, "sparsemax": _sparsemax_sort}
_NEWTON = {"entmax15": _entmax15_newton, "sparsemax": _sparsemax_newton}

ACTIVATIONS = {"softmax": softmax, "entmax15": entmax15, "sparsemax": sparsemax}
"""Gate activations by name: the values accepted by the layers' ``gate=`` argument.

Examples
--------
>>> sorted(ACTIVATIONS)
['entmax15', 'softmax', 'sparsemax']
>>> ACTIVATIONS["entmax15"] is entmax15
True
"""

NORMS = {None: None, "layernorm": layer_norm}
"""Logit normalisations by name (``None`` for none): the layers' ``gate_norm=`` values.

Examples
--------
>>> list(NORMS)
[None, 'layernorm']
"""
