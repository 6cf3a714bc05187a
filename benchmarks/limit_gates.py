"""Exact sparse gates for the benchmark's **limit**, written here from the ecosystem's pieces (no tensormoe code).

The limit of a layer (``chains.py``) is the fastest exact forward anyone could
write for it on a backend; its gate is the fastest of these candidates, each
checked exact first (:func:`is_exact`: equal to a float64 sort-based threshold
within float32 rounding) on the logits it is timed on:

=========  ==================  ==============================================================
backend    candidate           how
=========  ==================  ==============================================================
numpy      ``sort``            ``np.sort`` of each row, the closed-form threshold from the
                               cumulative sums (Peters et al. 2019; Martins & Astudillo 2016)
numpy      ``partition``       ``np.partition`` of the ``k`` largest (``k = 16``, doubled until
                               the support fits), the same closed form on them
pytorch    ``entmax``          the ``entmax`` package (``torch.sort``; ``pip install .[peers]``)
pytorch    ``entmax-k``        the ``entmax`` package with ``k=64`` (``torch.topk``, doubling ``k``)
pytorch    ``numpy-sort``      the NumPy ``sort`` (``partition``) candidate on the tensor's memory,
           ``numpy-partition`` with the closed-form backward (an ``autograd.Function``)
pytorch    ``compiled-newton`` ``torch.compile`` of eight Newton steps and a per-row exactness
                               check, rows not yet exact by the NumPy sort (``--compiled-gates``:
                               it compiles for seconds per shape)
jax        ``sort``            ``jnp.sort`` threshold, ``jax.jit``
jax        ``newton``          eight Newton steps, then ``lax.while_loop`` steps until every row
                               is exact, ``jax.jit``
=========  ==================  ==============================================================

Every candidate returns the gate of the last axis of float32 logits, is
differentiable where its framework is (PyTorch, JAX), and handles finite logits
(what a layer's normalised logits are).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

GATES = ("entmax15", "sparsemax")


# -- the closed form on sorted logits (NumPy, also the float64 reference) ----------------------------
def _shift(z: np.ndarray, gate: str) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z / 2 if gate == "entmax15" else z


def _tau_sorted(zs: Any, gate: str, xp: Any = np) -> tuple[Any, Any]:
    """Threshold and support size from the shifted logits ``zs`` sorted in descending order (a prefix of them
    suffices when the support lies inside it); ``xp`` is ``numpy`` or ``jax.numpy``."""
    k = xp.arange(1, zs.shape[-1] + 1, dtype=zs.dtype)
    cs = xp.cumsum(zs, -1)
    if gate == "sparsemax":
        size = xp.maximum((1 + k * zs > cs).sum(-1, keepdims=True), 1)
        return (xp.take_along_axis(cs, size - 1, -1) - 1) / size.astype(zs.dtype), size
    mean = cs / k
    ss = k * (xp.cumsum(zs * zs, -1) / k - mean * mean)
    tau = mean - xp.sqrt(xp.maximum((1 - ss) / k, 0))
    size = xp.maximum((tau <= zs).sum(-1, keepdims=True), 1)
    return xp.take_along_axis(tau, size - 1, -1), size


def _activate(z: np.ndarray, tau: np.ndarray, gate: str) -> np.ndarray:
    p = np.maximum(z - tau, 0)
    return p * p if gate == "entmax15" else p


def numpy_sort(z: np.ndarray, gate: str) -> np.ndarray:
    z = _shift(z, gate)
    tau, _ = _tau_sorted(-np.sort(-z, -1), gate)
    return _activate(z, tau, gate)


def numpy_partition(z: np.ndarray, gate: str, k: int = 16) -> np.ndarray:
    shape = z.shape
    z = _shift(z.reshape(-1, shape[-1]), gate)
    n = z.shape[-1]
    tau = np.empty((z.shape[0], 1), z.dtype)
    todo = np.arange(z.shape[0])
    while todo.size:
        k = min(k, n)
        part = z[todo]
        top = -np.sort(-np.partition(part, n - k, -1)[:, n - k:], -1) if k < n else -np.sort(-part, -1)
        t, size = _tau_sorted(top, gate)
        fits = (size[:, 0] < k) | (k == n)
        tau[todo[fits]] = t[fits]
        todo = todo[~fits]
        k *= 2
    return _activate(z, tau, gate).reshape(shape)


def reference(z: np.ndarray, gate: str) -> np.ndarray:
    """The gate in float64 by a full sort: what every candidate must equal."""
    return numpy_sort(np.asarray(z, np.float64), gate)


def is_exact(p: np.ndarray, z: np.ndarray, gate: str) -> bool:
    """Whether ``p`` (float32) equals the float64 reference on ``z`` within float32 rounding."""
    return bool(np.all(np.abs(np.asarray(p, np.float64) - reference(z, gate)) <= 2e-6))


# -- PyTorch ------------------------------------------------------------------------------------------
def _torch_candidates(compiled: bool) -> dict[str, Callable]:
    import torch

    try:
        import entmax
    except ImportError:  # the peers extra (pip install .[peers]) is not installed
        entmax = None

    class OnNumpy(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, z: torch.Tensor, gate: str, f: Callable) -> torch.Tensor:
            p = torch.from_numpy(f(z.detach().contiguous().numpy(), gate))
            ctx.gate = gate
            ctx.save_for_backward(p)
            return p

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
            (p,) = ctx.saved_tensors
            return _torch_vjp(p, grad, ctx.gate), None, None

    out = {
        "numpy-sort": lambda z, gate: OnNumpy.apply(z, gate, numpy_sort),
        "numpy-partition": lambda z, gate: OnNumpy.apply(z, gate, numpy_partition),
    }
    if entmax is not None:
        out["entmax"] = lambda z, gate: (entmax.entmax15 if gate == "entmax15" else entmax.sparsemax)(z, dim=-1)
        out["entmax-k"] = lambda z, gate: (entmax.entmax15 if gate == "entmax15" else entmax.sparsemax)(
            z, dim=-1, k=64)
    if compiled:
        out["compiled-newton"] = _torch_compiled_newton()
    return out


def _torch_vjp(p: Any, grad: Any, gate: str) -> Any:
    """The closed-form vector-Jacobian product: ``s * grad - s * sum(s * grad) / sum(s)``."""
    s = p.sqrt() if gate == "entmax15" else (p > 0).to(p.dtype)
    q = s * grad
    return q - s * q.sum(-1, keepdim=True) / s.sum(-1, keepdim=True)


def _torch_compiled_newton() -> Callable:
    import torch

    def search(z: torch.Tensor, entmax15: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Eight Newton (Michelot) steps from -1, the closed-form threshold on the support, and its exactness."""
        t = torch.full_like(z[..., :1], -1.0)
        for _ in range(8):
            d = (z - t).clamp_min(0)
            s1 = d.sum(-1, keepdim=True)
            if entmax15:
                t = t + ((d * d).sum(-1, keepdim=True) - 1) / (2 * s1)
            else:
                t = t + (s1 - 1) / (d > 0).sum(-1, keepdim=True)
        member = z > t
        k = member.sum(-1, keepdim=True).to(z.dtype)
        d = torch.where(member, z - t, 0)
        s1, s2 = d.sum(-1, keepdim=True), (d * d).sum(-1, keepdim=True)
        if entmax15:
            u = (s2 - 1) / (s1 + (s1 * s1 - k * (s2 - 1)).clamp_min(0).sqrt())
        else:
            u = (s1 - 1) / k
        low = torch.where(member, z - t, float("inf")).amin(-1, keepdim=True)
        return t + u, low >= u

    compiled = {g: torch.compile(lambda z, g=g: search(z, g == "entmax15"), fullgraph=True) for g in GATES}

    class Newton(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, z: torch.Tensor, gate: str) -> torch.Tensor:
            x = z - z.amax(-1, keepdim=True)
            x = x / 2 if gate == "entmax15" else x
            tau, exact = compiled[gate](x)
            p = (x - tau).clamp_min(0)
            p = p * p if gate == "entmax15" else p
            if not bool(exact.all()):  # rows not exact after the fixed steps: a sort for those rows
                rows = ~exact[..., 0]
                p[rows] = torch.from_numpy(numpy_sort(z[rows].detach().numpy(), gate))
            ctx.gate = gate
            ctx.save_for_backward(p)
            return p

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
            (p,) = ctx.saved_tensors
            return _torch_vjp(p, grad, ctx.gate), None

    return lambda z, gate: Newton.apply(z, gate)


# -- JAX ------------------------------------------------------------------------------------------------
def _jax_candidates() -> dict[str, Callable]:
    import jax
    import jax.numpy as jnp

    def shift(z: Any, gate: str) -> Any:
        z = z - jax.lax.stop_gradient(z.max(-1, keepdims=True))
        return z / 2 if gate == "entmax15" else z

    def activate(z: Any, tau: Any, gate: str) -> Any:
        p = jnp.maximum(z - tau, 0)
        return p * p if gate == "entmax15" else p

    def on_support(z: Any, member: Any, gate: str) -> Any:
        """Closed-form threshold of the support ``member`` (differentiable in ``z``)."""
        k = member.sum(-1, keepdims=True).astype(z.dtype)
        s1 = jnp.where(member, z, 0).sum(-1, keepdims=True)
        if gate == "sparsemax":
            return (s1 - 1) / k
        mean = s1 / k
        ss = jnp.where(member, (z - mean) ** 2, 0).sum(-1, keepdims=True)
        return mean - jnp.sqrt(jnp.maximum((1 - ss) / k, 1e-30))

    def sort(z: Any, gate: str) -> Any:
        z = shift(z, gate)
        zs = -jnp.sort(-jax.lax.stop_gradient(z), -1)
        _, size = _tau_sorted(zs, gate, jnp)
        member = z >= jnp.take_along_axis(zs, size - 1, -1)
        return activate(z, on_support(z, member, gate), gate)

    def newton(z: Any, gate: str) -> Any:
        z = shift(z, gate)
        zz = jax.lax.stop_gradient(z)

        def step(t: Any) -> Any:
            d = jnp.maximum(zz - t, 0)
            s1 = d.sum(-1, keepdims=True)
            if gate == "entmax15":
                return t + ((d * d).sum(-1, keepdims=True) - 1) / (2 * s1)
            return t + (s1 - 1) / (d > 0).sum(-1, keepdims=True)

        def exact(t: Any) -> Any:
            member = zz > t
            tau = on_support(zz, member, gate)
            return jnp.where(member, zz, jnp.inf).min(-1, keepdims=True) >= tau

        t = jax.lax.fori_loop(0, 8, lambda _, t: step(t), jnp.full(z.shape[:-1] + (1,), -1.0, z.dtype))
        t = jax.lax.while_loop(lambda t: ~exact(t).all(), lambda t: jnp.where(exact(t), t, step(t)), t)
        return activate(z, on_support(z, zz > t, gate), gate)

    return {
        "sort": jax.jit(sort, static_argnums=1),
        "newton": jax.jit(newton, static_argnums=1),
    }


# -- choosing the limit's gate ------------------------------------------------------------------------
def candidates(backend: str, compiled: bool = False) -> dict[str, Callable]:
    """The candidates of ``backend`` ("numpy", "pytorch", "jax"): ``name -> f(z, gate)``."""
    if backend == "numpy":
        return {"sort": numpy_sort, "partition": numpy_partition}
    if backend == "pytorch":
        return _torch_candidates(compiled)
    return _jax_candidates()


def fastest(backend: str, gate: str, z: Any, to_numpy: Callable, timer: Callable, compiled: bool = False
            ) -> tuple[str, Callable, dict[str, Any]]:
    """The fastest exact candidate on the logits ``z`` (an array of ``backend``).

    ``timer(fns)`` times ``{name: () -> result}`` side by side and returns
    ``{name: {"min_ms": ...}}``.  Returns the name, ``f(z)`` and a record of every
    candidate (exact or not, its time).
    """
    found = candidates(backend, compiled)
    zn = to_numpy(z)
    record: dict[str, Any] = {}
    exact = {}
    for name, f in found.items():
        try:
            ok = is_exact(to_numpy(f(z, gate)), zn, gate)
        except (RuntimeError, TypeError, ValueError) as err:  # e.g. a NumPy candidate on a CUDA tensor
            record[name] = {"exact": False, "error": f"{type(err).__name__}: {err}"[:200]}
            continue
        record[name] = {"exact": ok}
        if ok:
            exact[name] = f
    if not exact:
        raise RuntimeError(f"no exact {gate} candidate on {backend}: {record}")
    times = timer({name: (lambda f=f: f(z, gate)) for name, f in exact.items()})
    for name, t in times.items():
        record[name]["min_ms"] = t["min_ms"]
    best = min(times, key=lambda k: times[k]["min_ms"])
    return best, (lambda z, f=exact[best]: f(z, gate)), record

