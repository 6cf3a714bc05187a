"""How the suite measures: arrays of each backend, round-robin timing, thread control, peak RSS, worker processes.

Timing: every function compared in a row is warmed up (JAX: compiled) first, then
the functions are timed round-robin, one sample of each in turn; a sample averages
enough calls to last about a millisecond.  Each timing gives the median and the
minimum; targets are judged on the minimums (the best estimate of the true cost on
a shared, noisy machine).

Nothing here uses tensormoe: it is the framework code the benchmark needs that
neither the frameworks nor tensormoe's public API offer.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: Fast rows keep taking samples (beyond ``repeats``, up to MAX_SAMPLES) for this many seconds.
MIN_SAMPLING_S = 0.5
MAX_SAMPLES = 400
#: opt_einsum's name of each backend (what a plan's program and ``Plan.tune`` run on)
EINSUM_NAMES = {"numpy": "numpy", "pytorch": "torch", "jax": "jax"}


def to_numpy(a: Any) -> np.ndarray:
    """A NumPy array with the values of ``a`` (a NumPy, PyTorch or JAX array), detached from autograd."""
    if hasattr(a, "detach"):
        a = a.detach().cpu()
    return np.asarray(a)


class Backend:
    """One backend on one device: its arrays, their synchronisation, compilation and gradients."""

    def __init__(self, name: str, device: str = "cpu") -> None:
        self.name = name
        self.device = device
        if name == "jax":
            import jax

            self.device = str(jax.devices()[0].platform)

    @property
    def label(self) -> str:
        return self.name if self.device == "cpu" else f"{self.name}-{self.device}"

    def array(self, a: np.ndarray) -> Any:
        """``a`` (same dtype) as an array of this backend, on its device."""
        if self.name == "pytorch":
            import torch

            return torch.as_tensor(np.asarray(a), device=self.device)
        if self.name == "jax":
            import jax.numpy as jnp

            return jnp.asarray(a)
        return np.asarray(a)

    def params(self, params: dict[str, np.ndarray]) -> dict[str, Any]:
        return {k: self.array(v) for k, v in params.items()}

    numpy = staticmethod(to_numpy)

    def sync(self, out: Any) -> None:
        """Wait until ``out`` is computed (JAX's asynchronous dispatch, CUDA)."""
        if self.name == "jax":
            import jax

            jax.block_until_ready(out)
        elif self.name == "pytorch" and self.device != "cpu":
            import torch

            torch.cuda.synchronize()

    def compile(self, fn: Callable) -> Callable:
        """``jax.jit(fn)`` on JAX, ``fn`` elsewhere."""
        if self.name == "jax":
            import jax

            return jax.jit(fn)
        return fn

    def grad_step(self, f: Callable, params: dict, x: Any) -> Callable:
        """A call computing the gradients of ``sum(f(params, x))`` with respect to every parameter."""
        if self.name == "pytorch":
            leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
            first = next(iter(leaves))

            def step() -> Any:
                for v in leaves.values():
                    v.grad = None
                f(leaves, x).sum().backward()
                return leaves[first].grad

            return step
        import jax

        g = jax.jit(jax.grad(lambda p, x: f(p, x).sum()))
        return lambda: g(params, x)

    def tune(self, plan: Any, operands: list[Any]) -> None:
        """Time a ``tensormoe.contraction.Plan``'s candidate programs once on ``operands``, as a layer does
        (each candidate compiled on JAX)."""
        name = EINSUM_NAMES[self.name]
        wrap = None
        if self.name == "jax":
            import jax

            wrap = lambda program: jax.jit(functools.partial(program, backend=name))
        plan.tune(*operands, backend=name, sync=self.sync, wrap=wrap)


def set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def time_side_by_side(fns: dict[str, Callable[[], Any]], be: Backend, repeats: int, budget_s: float,
                      sample_s: float = 1e-3) -> dict[str, dict[str, float]]:
    """Median and minimum milliseconds per call of each function, timed round-robin after a warm-up.

    Past ``budget_s`` seconds sampling stops once every function has at least three samples.
    """
    began = time.perf_counter()
    numbers, samples = {}, {k: [] for k in fns}
    for key, fn in fns.items():
        be.sync(fn())  # warm-up (JAX: compile)
        start = time.perf_counter()
        be.sync(fn())
        once = time.perf_counter() - start
        numbers[key] = max(1, min(100, int(sample_s / max(once, 1e-7))))
        if numbers[key] == 1:
            samples[key].append(once)  # a slow function: the calibration call is its first sample
    for k in range(max(repeats, MAX_SAMPLES)):
        elapsed = time.perf_counter() - began
        if k >= 3 and elapsed > budget_s:
            break  # a slow or contended machine: enough samples for a median
        if k >= repeats and elapsed > MIN_SAMPLING_S:
            break  # fast rows keep sampling for MIN_SAMPLING_S: more samples, steadier minimums
        for key, fn in fns.items():
            n = numbers[key]
            start = time.perf_counter()
            for _ in range(n):
                out = fn()
            be.sync(out)
            samples[key].append((time.perf_counter() - start) / n)
    return {
        k: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v), "repeats": len(v), "number": numbers[k]}
        for k, v in samples.items()
    }


def ratio(num: dict[str, float], den: dict[str, float]) -> dict[str, float]:
    return {"median": num["median_ms"] / den["median_ms"], "min": num["min_ms"] / den["min_ms"]}


def verify(name: str, got: np.ndarray, want: np.ndarray) -> dict[str, Any]:
    """Max abs difference, relative to the output's scale; raise if the two disagree."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = float(np.abs(want).max()) or 1.0
    err = float(np.abs(got - want).max())
    ok = bool(got.shape == want.shape and np.isfinite(got).all() and err <= 2e-3 * scale + 1e-6)
    if not ok:
        raise RuntimeError(f"{name}: the hand chain disagrees with the layer (max |diff| {err:.3g}, scale {scale:.3g})")
    return {"check": name, "max_abs_diff": err, "scale": scale, "ok": ok}


# -- peak resident memory --------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def rss_window(fn: Callable[[], Any]) -> tuple[int, int, str]:
    """Resident bytes before ``fn()``, the peak during it, and how the peak was read.

    Freed set-up memory is returned to the system first (``malloc_trim``) and
    the kernel's peak counter is reset, so the peak is the call's own; where
    that is not possible, the process's lifetime peak (``getrusage``) is used.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS") * 1024
        fn()
        return before, _status_kib("VmHWM") * 1024, "peak RSS growth (VmHWM reset through /proc/self/clear_refs)"
    except (OSError, StopIteration, AttributeError):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        fn()
        return (before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "peak RSS growth (getrusage; lifetime peak, may read 0)")


# -- worker processes ------------------------------------------------------------------------------
def serve(work: Callable[[Any], dict[str, Any]], cases: list[Any]) -> None:
    """A worker process's side: ``ready``, then one JSON line per case as soon as it is done."""
    print("ready", flush=True)
    for case in cases:
        print(json.dumps(work(case)), flush=True)


def _lines(proc: subprocess.Popen, errors: Any) -> Callable[[float], str | None]:
    """A reader of ``proc``'s stdout lines that gives up (``None``) after ``timeout`` seconds."""
    buffer = bytearray()
    fd = proc.stdout.fileno()

    def read(timeout: float) -> str | None:
        deadline = time.perf_counter() + timeout
        while b"\n" not in buffer:
            left = deadline - time.perf_counter()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                proc.wait()
                errors.seek(0)
                raise RuntimeError(f"worker exited early (status {proc.returncode}):\n{errors.read()[-2000:]}")
            buffer.extend(chunk)
        line, _, rest = bytes(buffer).partition(b"\n")
        buffer[:] = rest
        return line.decode()

    return read


def run_cases(kind: str, cases: list[Any], timeout: float) -> list[dict[str, Any] | None]:
    """Each case run by ``run.py --worker kind`` in a fresh process; ``None`` for a case past ``timeout`` s.

    One worker runs the cases in turn; a case that times out kills it and a fresh
    worker takes the remaining ones.
    """
    results: list[dict[str, Any] | None] = [None] * len(cases)
    k = 0
    while k < len(cases):
        cmd = [sys.executable, str(HERE / "run.py"), "--worker", kind, "--spec", json.dumps(cases[k:])]
        with tempfile.TemporaryFile("w+") as errors:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, text=False, cwd=str(ROOT))
            read = _lines(proc, errors)
            try:
                if read(120) != "ready":
                    raise RuntimeError(f"the {kind} worker did not start")
                while k < len(cases):
                    line = read(timeout)
                    k += 1
                    if line is None:
                        break  # case k - 1 timed out
                    results[k - 1] = json.loads(line)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
    return results
