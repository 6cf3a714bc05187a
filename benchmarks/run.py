"""The tensormoe benchmark suite: every layer against its limit, side by side, on every installed backend.

    python benchmarks/run.py                      # default sizes, every installed backend (< 5 min, 2 cores)
    python benchmarks/run.py --quick              # tiny shapes, every section once (CI, < 40 s)
    python benchmarks/run.py --backends pytorch --device cuda --markdown

Sections (each a table; all in one JSON file, ``benchmarks/results/<timestamp>.json``
by default, with a PNG of the scaling plot next to it):

1. ``limit``     planned forward (``layer.apply``, gates included) vs the limit: the
                 same gate code plus the best hand-ordered matmul chain
                 (``benchmarks/chains.py``), checked equal to the layer first;
2. ``unplanned`` vs the same forward through the framework's einsum with defaults
                 (``torch.einsum``; ``jnp.einsum`` eager and jitted; ``tl.einsum`` =
                 ``np.einsum`` without a path, in a subprocess with a timeout);
3. ``dense``     vs the dense reference ``layer.dense_forward`` at growing expert counts;
4. ``linear``    vs a parameter-matched linear layer and a plain ``I x O`` one, forward
                 and forward+backward;
5. ``million``   the million-expert CP layer (``expert_dims=[1024, 1024]``) vs its limit
                 and a linear layer, with its FLOP breakdown and the forward's peak memory;
6. ``scaling``   time against the number of experts (1 to 10^6) and the rank (PNG);
plus ``gates``:  each gate activation on ``[64, 1024]`` and ``[64, 16]``.

Timing: every function is warmed up (JAX: compiled) first, then the compared
functions are timed round-robin, ``--repeats`` samples each; a sample averages
enough calls to last about a millisecond.  Ratios are reported from the medians
and from the minimums; targets are judged on the minimums (the best estimate of
the true cost on a shared, noisy machine).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import platform
import resource
import select
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402

import tensormoe  # noqa: E402
from tensormoe.layer import make_layer  # noqa: E402
from tensormoe.ops import get_ops  # noqa: E402

from chains import coefficients, limit_forward  # noqa: E402

KINDS = ("cp", "tucker", "tt", "tr")

#: Targets of issue 6 (CPU).
TARGET_LIMIT = 1.25  # planned / limit, every factorization, PyTorch and NumPy (and the million-expert layer)
TARGET_UNPLANNED = 5.0  # unplanned torch.einsum / planned, small batches
TARGET_MEMORY = 4.0
#: Fast rows keep taking samples (beyond ``--repeats``, up to MAX_SAMPLES) for this many seconds.
MIN_SAMPLING_S = 0.5
MAX_SAMPLES = 400
#: Seconds of sampling per table row before it stops at the minimum of three samples (``--row-budget``).
ROW_BUDGET_S = [3.0]  # measured forward memory / (B*(I+O+R+sum N) + params) elements, as bytes


def sizes(quick: bool) -> dict[str, Any]:
    """Problem sizes of the default run and of ``--quick``."""
    if quick:
        return {
            "I": 32, "O": 32, "N": 16, "batches": [8], "small_batch": 8,
            "ranks": {"cp": 8, "tucker": [4, 4, 4], "tt": [1, 4, 4, 1], "tr": [2, 4, 4, 2]},
            "repeats": 3, "dense_ns": [16, 64], "dense_cap": 2**17, "dense_repeats": 2, "linear_kinds": ["cp"],
            "unplanned_kinds": ["cp"], "rss_subprocess": False, "unplanned_extras": False,
            "million": [32, 32], "million_batch": 8, "gate_rank": 4,
            "scaling_ns": [1, [16, 16]], "scaling_rank_n": 16, "scaling_ranks": [8], "scaling_rank": 4,
            "scaling_batch": 8, "scaling_repeats": 2, "gate_shapes": [[8, 32]],
            "numpy_timeout": 5.0,
            "overhead_batch": 1, "overhead_ranks": {"cp": 4, "tucker": [2, 2, 2], "tt": [1, 2, 2, 1], "tr": [2, 2, 2, 2]},
        }
    return {
        "I": 768, "O": 768, "N": 1024, "batches": [64, 4], "small_batch": 4,
        "ranks": {"cp": 256, "tucker": [64, 64, 64], "tt": [1, 32, 32, 1], "tr": [8, 16, 16, 8]},
        "repeats": 25, "dense_ns": [8, 32, 128, 512], "dense_cap": 2**27, "dense_repeats": 2, "linear_kinds": list(KINDS),
        "unplanned_kinds": list(KINDS), "rss_subprocess": True, "unplanned_extras": True,
        "million": [1024, 1024], "million_batch": 64, "gate_rank": 64,
        "scaling_ns": [1, 16, 256, 4096, [256, 256], [1024, 1024]], "scaling_rank_n": 1024,
        "scaling_ranks": [16, 64, 256, 1024], "scaling_rank": 64, "scaling_batch": 64, "scaling_repeats": 5,
        "gate_shapes": [[64, 1024], [64, 16]], "numpy_timeout": 2.0,
        "overhead_batch": 1, "overhead_ranks": {"cp": 32, "tucker": [16, 16, 16], "tt": [1, 8, 8, 1], "tr": [4, 8, 8, 4]},
    }


# -- problems ------------------------------------------------------------------------------
def make_case(kind: str, in_dim: int, out_dim: int, dims: list[int], ranks: Any, batch: int, seed: int = 0,
              **kwargs: Any) -> tuple[Any, dict[str, np.ndarray], np.ndarray]:
    """A NumPy-built layer, its parameters as NumPy arrays (random gates) and an input ``x[batch, I]``.

    The gates are drawn at random (the layers start them at zero, i.e. uniform
    coefficients) so the sparse activations do real work.
    """
    with tensormoe.backend_context("numpy"):
        layer = make_layer(kind, in_dim, out_dim, dims, ranks, seed=seed, **kwargs)
        params = {k: np.asarray(v) for k, v in layer.params.items()}
    rng = np.random.default_rng(seed + 1)
    for name, shape in layer.param_shapes().items():
        if name.startswith("gate"):
            params[name] = rng.normal(0.0, 1.0 / math.sqrt(in_dim), size=shape).astype("float32")
    x = rng.normal(size=(batch, in_dim)).astype("float32")
    return layer, params, x


class Backend:
    """One backend on one device: arrays, synchronisation, compilation."""

    def __init__(self, name: str, device: str = "cpu") -> None:
        self.name = name
        self.ops = get_ops(name)
        self.device = device
        if name == "jax":
            import jax

            self.device = str(jax.devices()[0].platform)

    @property
    def label(self) -> str:
        return self.name if self.device == "cpu" else f"{self.name}-{self.device}"

    def array(self, a: np.ndarray) -> Any:
        out = self.ops.asarray(np.asarray(a), str(np.asarray(a).dtype))
        if self.name == "pytorch" and self.device != "cpu":
            out = out.to(self.device)
        return out

    def params(self, params: dict[str, np.ndarray]) -> dict[str, Any]:
        return {k: self.array(v) for k, v in params.items()}

    def numpy(self, a: Any) -> np.ndarray:
        return self.ops.to_numpy(a.detach() if hasattr(a, "detach") else a)

    def sync(self, out: Any) -> None:
        if self.name == "jax":
            import jax

            jax.block_until_ready(out)
        elif self.name == "pytorch" and self.device != "cpu":
            import torch

            torch.cuda.synchronize()

    def compile(self, fn: Callable) -> Callable:
        if self.name == "jax":
            import jax

            return jax.jit(fn)
        return fn


def time_side_by_side(fns: dict[str, Callable[[], Any]], be: Backend, repeats: int,
                      sample_s: float = 1e-3, budget_s: float | None = None) -> dict[str, dict[str, float]]:
    """Median and minimum milliseconds per call of each function, timed round-robin after a warm-up.

    ``budget_s`` (default :data:`ROW_BUDGET_S`) bounds the sampling time: past it,
    sampling stops once every function has at least three samples.
    """
    budget_s = ROW_BUDGET_S[0] if budget_s is None else budget_s
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


def unplanned_operands(layer: Any, params: dict, x: Any, ops: Any) -> list[Any]:
    """The forward equation's operands: gates' coefficients, ``[x, 1]``, the factors."""
    xin = ops.concat_ones(x) if layer.bias else x
    return [*coefficients(layer, params, x, ops), xin, *layer.factorization.gather_params(params, {}, ops)]


# -- workers (fresh subprocesses) ------------------------------------------------------------
def worker(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run in a fresh interpreter: the unplanned NumPy einsum, or the RSS growth of one forward."""
    if kind == "unplanned-numpy":
        import tensorly as tl

        tl.set_backend("numpy")
        ops = get_ops("numpy")
        print("ready", flush=True)
        for case in spec:  # one JSON line per case, as soon as it is done
            layer, params, x = make_case(case["kind"], case["I"], case["O"], case["dims"], case["ranks"], case["batch"])
            eq = layer.factorization.forward_equation()
            start = time.perf_counter()
            y = tl.einsum(eq, *unplanned_operands(layer, params, x, ops))
            seconds = time.perf_counter() - start
            want = np.asarray(layer.apply(params, x))
            print(json.dumps({"seconds": seconds, "max_abs_diff": float(np.abs(y - want).max()),
                              "scale": float(np.abs(want).max())}), flush=True)
        return None
    if kind == "rss":
        backend = spec["backend"]
        if backend == "pytorch":
            import torch

            torch.set_num_threads(spec["threads"])
        layer, params, x = make_case("cp", spec["I"], spec["O"], spec["dims"], spec["rank"], spec["batch"])
        with tensormoe.backend_context(backend):
            be = Backend(backend)
            p, xb, x1 = be.params(params), be.array(x), be.array(x[:1])
            be.sync(layer.apply(p, x1))  # start-up: thread pools, lazy initialisation
            before, after = _rss_window(lambda: be.sync(layer.apply(p, xb)))
        return {"bytes": after - before, "method": _RSS_METHOD[0]}
    raise ValueError(f"--worker {kind!r} is not a worker; expected 'unplanned-numpy' or 'rss'")


_RSS_METHOD = ["peak RSS growth (VmHWM reset through /proc/self/clear_refs)"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _rss_window(fn: Callable[[], Any]) -> tuple[int, int]:
    """Resident bytes before ``fn()`` and the peak during it.

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
        return before, _status_kib("VmHWM") * 1024
    except (OSError, StopIteration, AttributeError):
        _RSS_METHOD[0] = "peak RSS growth (getrusage; lifetime peak, may read 0)"
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        fn()
        return before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_worker(kind: str, spec: Any, timeout: float) -> dict[str, Any] | None:
    """Run :func:`worker` in a subprocess; ``None`` when it times out."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--spec", json.dumps(spec)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return None
    if done.returncode:
        raise RuntimeError(f"worker {kind} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _lines(proc: subprocess.Popen) -> Callable[[float], str | None]:
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
                raise RuntimeError(f"the NumPy einsum worker exited early (status {proc.returncode})")
            buffer.extend(chunk)
        line, _, rest = bytes(buffer).partition(b"\n")
        buffer[:] = rest
        return line.decode()

    return read


def unplanned_numpy(cases: list[dict[str, Any]], timeout: float) -> list[dict[str, Any] | None]:
    """Seconds of ``tl.einsum`` (NumPy, no path) for each case, in a subprocess; ``None`` past ``timeout`` s.

    One worker runs the cases in turn; a case that times out kills it and a fresh
    worker takes the remaining ones.
    """
    results: list[dict[str, Any] | None] = [None] * len(cases)
    k = 0
    while k < len(cases):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "unplanned-numpy",
               "--spec", json.dumps(cases[k:])]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=str(ROOT))
        read = _lines(proc)
        try:
            if read(120) != "ready":
                raise RuntimeError("the NumPy einsum worker did not start")
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


# -- sections -------------------------------------------------------------------------------
def section_limit(be: Backend, cfg: dict, out: dict) -> None:
    """Sections 1 and 2: planned vs the limit and vs the unplanned einsum."""
    ops = be.ops
    numpy_rows: list[tuple[dict, dict]] = []
    for kind in KINDS:
        for batch in cfg["batches"]:
            layer, pn, xn = make_case(kind, cfg["I"], cfg["O"], [cfg["N"]], cfg["ranks"][kind], batch)
            p, x = be.params(pn), be.array(xn)
            limit = be.compile(lambda p, x, layer=layer: limit_forward(layer, p, x, ops))
            y_planned = be.numpy(layer.apply(p, x))
            out["verified"].append({"backend": be.label, "kind": kind, "batch": batch,
                                    **verify(f"{be.label} {kind} B={batch}", be.numpy(limit(p, x)), y_planned)})
            fns = {"planned": lambda layer=layer, p=p, x=x: layer.apply(p, x),
                   "limit": lambda limit=limit, p=p, x=x: limit(p, x)}
            eq = layer.factorization.forward_equation()
            if kind not in cfg["unplanned_kinds"]:
                pass
            elif be.name == "pytorch":
                import torch

                fns["unplanned"] = lambda layer=layer, p=p, x=x, eq=eq: torch.einsum(eq, *unplanned_operands(layer, p, x, ops))
            elif be.name == "jax":
                import jax.numpy as jnp

                fns["unplanned"] = lambda layer=layer, p=p, x=x, eq=eq: jnp.einsum(eq, *unplanned_operands(layer, p, x, ops))
            if be.name == "jax" and kind in cfg["unplanned_kinds"] and cfg["unplanned_extras"]:
                jitted = be.compile(lambda p, x, layer=layer, eq=eq: jnp.einsum(eq, *unplanned_operands(layer, p, x, ops)))
                fns["unplanned_jit"] = lambda jitted=jitted, p=p, x=x: jitted(p, x)
            if "unplanned" in fns and cfg["unplanned_extras"]:  # the contraction alone, operands computed once: cached plan vs the einsum
                operands = unplanned_operands(layer, p, x, ops)
                einsum = torch.einsum if be.name == "pytorch" else jnp.einsum
                fns["contract_planned"] = lambda operands=operands, eq=eq, layer=layer: ops.contract(
                    eq, operands, layer.optimize)
                fns["contract_unplanned"] = lambda operands=operands, eq=eq, einsum=einsum: einsum(eq, *operands)
            for key in [k for k in fns if "unplanned" in k]:
                verify(f"{be.label} {kind} B={batch} {key}", be.numpy(fns[key]()), y_planned)
            t = time_side_by_side(fns, be, cfg["repeats"])
            r = ratio(t["planned"], t["limit"])
            cost = layer.cost(batch)
            out["limit"].append({
                "backend": be.label, "kind": kind, "ranks": cfg["ranks"][kind], "batch": batch,
                "planned": t["planned"], "limit": t["limit"], "ratio": r, "gflops": cost.flops / 1e9,
                "target": f"<= {TARGET_LIMIT}" if be.name in ("numpy", "pytorch") else None,
                "met": r["min"] <= TARGET_LIMIT if be.name in ("numpy", "pytorch") else None,
            })
            row = {"backend": be.label, "kind": kind, "batch": batch, "planned": t["planned"]}
            if kind not in cfg["unplanned_kinds"]:
                continue
            if be.name == "numpy":
                if batch != cfg["small_batch"]:
                    continue  # one NumPy attempt per factorization (it times out at realistic sizes)
                numpy_rows.append((row, {"kind": kind, "I": cfg["I"], "O": cfg["O"], "dims": [cfg["N"]],
                                         "ranks": cfg["ranks"][kind], "batch": batch}))
            else:
                row["unplanned"] = t["unplanned"]
                row["speedup"] = ratio(t["unplanned"], t["planned"])
                if "contract_planned" in t:
                    row["contraction"] = {"planned": t["contract_planned"], "unplanned": t["contract_unplanned"],
                                          "speedup": ratio(t["contract_unplanned"], t["contract_planned"])}
                if "unplanned_jit" in t:
                    row["unplanned_jit"] = t["unplanned_jit"]
                    row["speedup_jit"] = ratio(t["unplanned_jit"], t["planned"])
            if be.name == "numpy":
                row["target"] = row["met"] = None
                out["unplanned"].append(row)
                continue
            row["target"] = row["met"] = None  # the target is judged per call, in section_overhead
            out["unplanned"].append(row)
    if numpy_rows:  # tl.einsum on NumPy: no path, so a timeout per case, after the in-process timings
        timeout = cfg["numpy_timeout"]
        for (row, _), res in zip(numpy_rows, unplanned_numpy([spec for _, spec in numpy_rows], timeout)):
            row["timeout_s"] = timeout
            if res is None or res["seconds"] > timeout:
                row["unplanned"], row["speedup"] = None, {"min": None, "median": None}
            else:
                row["unplanned"] = {"median_ms": 1e3 * res["seconds"], "min_ms": 1e3 * res["seconds"], "repeats": 1}
                row["speedup"] = ratio(row["unplanned"], row["planned"])
                if res["max_abs_diff"] > 2e-3 * res["scale"] + 1e-6:
                    raise RuntimeError(f"tl.einsum disagrees with the layer for {row['kind']}: {res}")


def section_overhead(be: Backend, cfg: dict, out: dict) -> None:
    """Section 2b: the contraction alone at small batch, cached plan vs the framework's einsum per call.

    With large ranks a small-batch contraction is bound by reading the factors, which
    both do alike; with small ranks what is left is the per-call cost of the einsum
    (parsing, path search) that the cached plan does not pay.
    """
    if be.name == "numpy":
        return  # NumPy's unplanned einsum has no path at all: section 2 times it out
    if be.name == "pytorch":
        import torch

        einsum = torch.einsum
    else:
        import jax.numpy as jnp

        einsum = jnp.einsum
    ops = be.ops
    for ranks_name, ranks in (("small", cfg["overhead_ranks"]), ("large", cfg["ranks"])):
        for kind in KINDS:
            layer, pn, xn = make_case(kind, cfg["I"], cfg["O"], [cfg["N"]], ranks[kind], cfg["overhead_batch"])
            p, x = be.params(pn), be.array(xn)
            operands = unplanned_operands(layer, p, x, ops)
            eq = layer.factorization.forward_equation()
            fns = {"planned": lambda operands=operands, eq=eq, layer=layer: ops.contract(eq, operands, layer.optimize),
                   "unplanned": lambda operands=operands, eq=eq: einsum(eq, *operands)}
            want = be.numpy(layer.apply(p, x))
            for key, fn in fns.items():
                verify(f"{be.label} {kind} overhead {key}", be.numpy(fn()), want)
            t = time_side_by_side(fns, be, cfg["repeats"])
            speedup = ratio(t["unplanned"], t["planned"])
            judged = be.name == "pytorch"
            out["overhead"].append({
                "backend": be.label, "kind": kind, "ranks": ranks[kind], "rank_size": ranks_name,
                "batch": cfg["overhead_batch"], "planned": t["planned"], "unplanned": t["unplanned"],
                "speedup": speedup, "target": f">= {TARGET_UNPLANNED}x" if judged else None,
                "met": speedup["min"] >= TARGET_UNPLANNED if judged else None,
            })


def section_dense(be: Backend, cfg: dict, out: dict) -> None:
    """Section 3: planned CP vs the dense reference at growing expert counts (W under a memory cap)."""
    batch = cfg["batches"][0]
    for n in cfg["dense_ns"]:
        layer, pn, xn = make_case("cp", cfg["I"], cfg["O"], [n], cfg["ranks"]["cp"], batch)
        w_bytes = layer.n_dense_params * 4
        row = {"backend": be.label, "experts": n, "batch": batch, "dense_w_bytes": w_bytes}
        if w_bytes > cfg["dense_cap"]:
            row.update(skipped=f"dense W {w_bytes / 2**30:.2f} GiB > cap {cfg['dense_cap'] / 2**30:.2f} GiB")
            out["dense"].append(row)
            continue
        p, x = be.params(pn), be.array(xn)
        verify(f"{be.label} dense N={n}", be.numpy(layer.dense_forward(p, x)), be.numpy(layer.apply(p, x)))
        t = time_side_by_side({"planned": lambda: layer.apply(p, x), "dense": lambda: layer.dense_forward(p, x)},
                              be, cfg["dense_repeats"])
        row.update(planned=t["planned"], dense=t["dense"], ratio=ratio(t["dense"], t["planned"]))
        out["dense"].append(row)


def _grad_fns(be: Backend, layer: Any, p: dict, x: Any, w: Any) -> dict[str, Callable]:
    """Forward+backward of the layer and of ``x @ w`` (gradients w.r.t. the parameters)."""
    if be.name == "pytorch":
        pt = {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}
        wt = w.detach().clone().requires_grad_(True)

        def layer_step():
            for v in pt.values():
                v.grad = None
            layer.apply(pt, x).sum().backward()
            return pt["factor_0"].grad

        def linear_step():
            wt.grad = None
            (x @ wt).sum().backward()
            return wt.grad

        return {"layer": layer_step, "linear": linear_step}
    if be.name == "jax":
        import jax

        g_layer = jax.jit(jax.grad(lambda p, x: layer.apply(p, x).sum()))
        g_linear = jax.jit(jax.grad(lambda w, x: (x @ w).sum()))
        return {"layer": lambda: g_layer(p, x), "linear": lambda: g_linear(w, x)}
    return {}


def section_linear(be: Backend, cfg: dict, out: dict) -> None:
    """Section 4: each layer vs a parameter-matched linear layer and a plain I x O one."""
    batch = cfg["batches"][0]
    rng = np.random.default_rng(7)
    for kind in cfg["linear_kinds"]:
        layer, pn, xn = make_case(kind, cfg["I"], cfg["O"], [cfg["N"]], cfg["ranks"][kind], batch)
        p, x = be.params(pn), be.array(xn)
        width = layer.n_params // cfg["I"]
        w_pm = be.array(rng.normal(size=(cfg["I"], width)).astype("float32"))
        w_io = be.array(rng.normal(size=(cfg["I"], cfg["O"])).astype("float32"))
        matmul = be.compile(lambda x, w: x @ w)
        t = time_side_by_side({"layer": lambda: layer.apply(p, x), "matched": lambda: matmul(x, w_pm),
                               "linear": lambda: matmul(x, w_io)}, be, cfg["repeats"])
        row = {"backend": be.label, "kind": kind, "batch": batch, "params": layer.n_params,
               "matched_shape": [cfg["I"], width], "forward": t,
               "forward_vs_matched": ratio(t["layer"], t["matched"]), "forward_vs_linear": ratio(t["layer"], t["linear"])}
        grads = _grad_fns(be, layer, p, x, w_pm)
        if grads:
            g_io = _grad_fns(be, layer, p, x, w_io)["linear"]
            tb = time_side_by_side({"layer": grads["layer"], "matched": grads["linear"], "linear": g_io}, be,
                                   cfg["repeats"])
            row.update(backward=tb, backward_vs_matched=ratio(tb["layer"], tb["matched"]),
                       backward_vs_linear=ratio(tb["layer"], tb["linear"]))
        out["linear"].append(row)


def has_gate_rank() -> bool:
    """Whether this version of the layers takes ``gate_rank=`` (a low-rank gate projection)."""
    return any("gate_rank" in inspect.signature(cls.__init__).parameters for cls in (tensormoe.CPMMoE, tensormoe.MMoE))


def million_rank(in_dim: int, out_dim: int, dims: list[int], flops_factor: float = 4.0) -> int:
    """CP rank making the layer's forward (gates included) about ``flops_factor`` linear layers, in steps of 32."""
    gates = in_dim * sum(dims)
    per_rank = sum(dims) + in_dim + 1 + out_dim
    r = (flops_factor * in_dim * out_dim - gates) / per_rank
    step = 32 if r >= 64 else 1
    return max(1, int(round(r / step)) * step)


def _forward_memory(be: Backend, layer: Any, p: dict, x: Any, spec: dict) -> dict[str, Any]:
    """Peak memory of one forward beyond the parameters and the input, and how it was measured."""
    if be.name == "numpy":
        layer.apply(p, x)
        tracemalloc.start()
        tracemalloc.reset_peak()
        layer.apply(p, x)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return {"bytes": peak, "method": "tracemalloc peak of one call"}
    if be.name == "jax":
        import jax

        compiled = jax.jit(lambda p, x: layer.apply(p, x)).lower(p, x).compile()
        ma = compiled.memory_analysis()
        if ma is None:
            return {"bytes": None, "method": "XLA memory_analysis unavailable"}
        return {"bytes": int(ma.temp_size_in_bytes + ma.output_size_in_bytes),
                "method": "XLA memory_analysis: temp + output"}
    if be.device != "cpu":
        import torch

        be.sync(layer.apply(p, x))
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        be.sync(layer.apply(p, x))
        return {"bytes": int(torch.cuda.max_memory_allocated() - before), "method": "torch.cuda.max_memory_allocated"}
    if spec["subprocess"]:
        res = run_worker("rss", {**spec, "backend": be.name}, 120)
        where = "one call in a fresh process after a warm-up at B=1"
    else:
        before, after = _rss_window(lambda: be.sync(layer.apply(p, x)))
        res, where = {"bytes": after - before, "method": _RSS_METHOD[0]}, "one call in this process (after the timings)"
    if res is None:
        return {"bytes": None, "method": "peak RSS growth: the worker timed out"}
    note = "" if res["bytes"] > 0 else " (0: the call fit in memory already resident, below what RSS resolves)"
    return {"bytes": max(0, res["bytes"]), "method": f"{res['method']}, {where}{note}"}


def section_million(be: Backend, cfg: dict, out: dict) -> None:
    """Section 5: the million-expert CP layer vs its limit and a linear layer, with FLOPs and peak memory."""
    dims = cfg["million"]
    batch = cfg["million_batch"]
    i, o = cfg["I"], cfg["O"]
    rank = million_rank(i, o, dims)
    layer, pn, xn = make_case("cp", i, o, dims, rank, batch)
    p, x = be.params(pn), be.array(xn)
    ops = be.ops
    limit = be.compile(lambda p, x: limit_forward(layer, p, x, ops))
    y = be.numpy(layer.apply(p, x))
    out["verified"].append({"backend": be.label, "kind": "cp-million", "batch": batch,
                            **verify(f"{be.label} million", be.numpy(limit(p, x)), y)})
    w_io = be.array(np.random.default_rng(3).normal(size=(i, o)).astype("float32"))
    matmul = be.compile(lambda x, w: x @ w)
    fns = {"planned": lambda: layer.apply(p, x), "limit": lambda: limit(p, x), "linear": lambda: matmul(x, w_io)}
    low = None
    if has_gate_rank():
        low, lpn, _ = make_case("cp", i, o, dims, rank, batch, gate_rank=cfg["gate_rank"])
    if low is not None:
        lp = be.params(lpn)
        fns["gate_rank"] = lambda: low.apply(lp, x)
    t = time_side_by_side(fns, be, cfg["repeats"])
    cost = layer.cost(batch)
    bound_elems = batch * (i + o + rank + sum(dims)) + layer.n_params
    mem = _forward_memory(be, layer, p, x, {"I": i, "O": o, "dims": dims, "rank": rank, "batch": batch,
                                            "threads": cfg.get("threads", 1), "subprocess": cfg["rss_subprocess"]})
    mem_ratio = None if mem["bytes"] is None else mem["bytes"] / (4 * bound_elems)
    r = ratio(t["planned"], t["limit"])
    row = {
        "backend": be.label, "expert_dims": dims, "experts": math.prod(dims), "rank": rank, "batch": batch,
        "times": t, "vs_limit": r, "vs_linear": ratio(t["planned"], t["linear"]),
        "flops": {"gates": cost.gate_flops, "contraction": cost.forward_flops, "total": cost.flops,
                  "linear": cost.linear_flops, "total_over_linear": cost.flops / cost.linear_flops,
                  "gate_share": cost.gate_flops / cost.flops},
        "params": layer.n_params, "dense_w_bytes": layer.n_dense_params * 4,
        "memory": {**mem, "bound_bytes": 4 * bound_elems, "over_bound": mem_ratio,
                   "target": f"<= {TARGET_MEMORY} x 4 B x (B*(I+O+R+sum N) + params)",
                   "met": None if mem_ratio is None else mem_ratio <= TARGET_MEMORY},
        "target": f"planned/limit <= {TARGET_LIMIT}", "met": r["min"] <= TARGET_LIMIT,
    }
    if low is not None:
        row["gate_rank"] = {"gate_rank": cfg["gate_rank"], "vs_linear": ratio(t["gate_rank"], t["linear"]),
                            "vs_full_gates": ratio(t["gate_rank"], t["planned"]), "flops": low.cost(batch).flops}
    out["million"].append(row)


def section_scaling(be: Backend, cfg: dict, out: dict) -> None:
    """Section 6: time of the CP forward against the number of experts and against the rank."""
    batch = cfg["scaling_batch"]
    points = [("experts", n if isinstance(n, list) else [n], cfg["scaling_rank"]) for n in cfg["scaling_ns"]]
    points += [("rank", [cfg["scaling_rank_n"]], r) for r in cfg["scaling_ranks"]]
    for axis, dims, rank in points:
        layer, pn, xn = make_case("cp", cfg["I"], cfg["O"], dims, rank, batch)
        p, x = be.params(pn), be.array(xn)
        t = time_side_by_side({"planned": lambda: layer.apply(p, x)}, be, cfg["scaling_repeats"])["planned"]
        out["scaling"].append({"backend": be.label, "axis": axis, "expert_dims": dims, "experts": math.prod(dims),
                               "rank": rank, "batch": batch, **t, "gflops": layer.cost(batch).flops / 1e9})


def section_gates(be: Backend, cfg: dict, out: dict) -> None:
    """Each gate activation on the configured logit shapes."""
    from tensormoe import gates

    rng = np.random.default_rng(5)
    for shape in cfg["gate_shapes"]:
        z = be.array(rng.normal(size=shape).astype("float32"))
        fns = {}
        for name in ("softmax", "entmax15", "sparsemax"):
            f = be.compile(lambda z, act=gates.ACTIVATIONS[name]: act(z, ops=be.ops))
            fns[name] = lambda f=f: f(z)
        for name in ("entmax15", "sparsemax"):  # both exact threshold methods, side by side
            other = "sort" if be.name == "jax" else "newton"  # the method "auto" does not pick there
            f = be.compile(lambda z, act=gates.ACTIVATIONS[name], m=other: act(z, ops=be.ops, method=m))
            fns[f"{name} ({other})"] = lambda f=f: f(z)
        t = time_side_by_side(fns, be, cfg["repeats"])
        for name, v in t.items():
            out["gates"].append({"backend": be.label, "gate": name, "shape": shape, **v})


SECTIONS = {"limit": section_limit, "overhead": section_overhead, "dense": section_dense, "linear": section_linear,
            "million": section_million, "scaling": section_scaling, "gates": section_gates}


# -- reporting ---------------------------------------------------------------------------------
def _ms(t: dict | None) -> str:
    return "-" if t is None else f"{t['median_ms']:.3g} / {t['min_ms']:.3g}"


def _x(r: dict | None, key: str = "min") -> str:
    return "-" if r is None or r.get(key) is None else f"{r[key]:.2f}x"


def _met(v: Any) -> str:
    return "" if v is None else ("yes" if v else "NO")


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def tables(res: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """Every section as (title, headers, rows) of strings."""
    out = []
    out.append(("1. Planned forward vs the limit (gates + hand-ordered matmul chain); times ms median / min",
                ["backend", "layer", "ranks", "B", "planned", "limit", "planned/limit (min, median)", "target", "met"],
                [[r["backend"], r["kind"], str(r["ranks"]), str(r["batch"]), _ms(r["planned"]), _ms(r["limit"]),
                  f"{_x(r['ratio'])}, {_x(r['ratio'], 'median')}", r["target"] or "", _met(r["met"])]
                 for r in res["limit"]]))
    rows = []
    for r in res["unplanned"]:
        unpl = _ms(r["unplanned"]) if r["unplanned"] is not None else f">{r['timeout_s']:.0f} s (timed out)"
        speed = _x(r["speedup"]) if r["speedup"]["min"] is not None else f">{1e3 * r['timeout_s'] / r['planned']['min_ms']:.0f}x"
        jit = f"{_ms(r['unplanned_jit'])} ({_x(r['speedup_jit'])})" if "unplanned_jit" in r else ""
        c = r.get("contraction")
        alone = f"{_ms(c['planned'])} vs {_ms(c['unplanned'])} ({_x(c['speedup'])})" if c else ""
        rows.append([r["backend"], r["kind"], str(r["batch"]), _ms(r["planned"]), unpl, speed, jit, alone,
                     r["target"] or "", _met(r["met"])])
    out.append(("2. Planned vs unplanned einsum with defaults (same gates); speed-up = unplanned/planned (min)",
                ["backend", "layer", "B", "planned", "unplanned", "speed-up", "unplanned jit (speed-up)",
                 "contraction alone: planned vs unplanned (speed-up)", "target", "met"],
                rows))
    out.append(("2b. The contraction alone per call at small batch: cached plan vs the framework's einsum (ms median / min)",
                ["backend", "layer", "ranks", "B", "planned", "unplanned einsum", "speed-up (min)", "target", "met"],
                [[r["backend"], r["kind"], str(r["ranks"]), str(r["batch"]), _ms(r["planned"]), _ms(r["unplanned"]),
                  _x(r["speedup"]), r["target"] or "", _met(r["met"])] for r in res.get("overhead", [])]))
    out.append(("3. Planned CP vs the dense reference through W (dense_forward)",
                ["backend", "experts", "B", "dense W", "planned", "dense", "dense/planned"],
                [[r["backend"], str(r["experts"]), str(r["batch"]), _bytes(r["dense_w_bytes"]),
                  _ms(r.get("planned")), _ms(r.get("dense")) if "dense" in r else r.get("skipped", ""),
                  _x(r.get("ratio"))] for r in res["dense"]]))
    out.append(("4. Layer vs parameter-matched linear (x @ W[I, params/I]) and I x O linear; ratios layer/linear (min)",
                ["backend", "layer", "params", "fwd layer", "fwd matched", "fwd IxO", "fwd /matched", "fwd /IxO",
                 "fwd+bwd layer", "fwd+bwd /matched", "fwd+bwd /IxO"],
                [[r["backend"], r["kind"], f"{r['params']:,}", _ms(r["forward"]["layer"]), _ms(r["forward"]["matched"]),
                  _ms(r["forward"]["linear"]), _x(r["forward_vs_matched"]), _x(r["forward_vs_linear"]),
                  _ms(r.get("backward", {}).get("layer")), _x(r.get("backward_vs_matched")),
                  _x(r.get("backward_vs_linear"))] for r in res["linear"]]))
    rows = []
    for r in res["million"]:
        f, m = r["flops"], r["memory"]
        rows.append([
            r["backend"], f"{r['expert_dims']} = {r['experts']:,}", str(r["rank"]), str(r["batch"]),
            _ms(r["times"]["planned"]), _ms(r["times"]["limit"]), _x(r["vs_limit"]), _met(r["met"]),
            _ms(r["times"]["linear"]), _x(r["vs_linear"]),
            f"{f['total_over_linear']:.1f}x linear, {100 * f['gate_share']:.0f}% in gates",
            (f"{_x(r['gate_rank']['vs_linear'])} (r={r['gate_rank']['gate_rank']})" if "gate_rank" in r else "n/a"),
            f"{_bytes(m['bytes'])} ({m['over_bound']:.2f}x bound {_bytes(m['bound_bytes'])}) {_met(m['met'])}"
            if m["bytes"] is not None else "-",
            _bytes(r["dense_w_bytes"]),
        ])
    out.append(("5. Million-expert CP layer vs its limit and the I x O linear layer",
                ["backend", "experts", "R", "B", "planned", "limit", "planned/limit", "<= 1.25 met", "linear",
                 "planned/linear", "FLOPs", "gate_rank: /linear", "forward peak memory (vs bound), met", "dense W"],
                rows))
    out.append(("6. Scaling of the CP forward (planned, gates included)",
                ["backend", "axis", "expert_dims", "experts", "R", "B", "ms median / min", "GFLOP"],
                [[r["backend"], r["axis"], str(r["expert_dims"]), f"{r['experts']:,}", str(r["rank"]), str(r["batch"]),
                  _ms(r), f"{r['gflops']:.3g}"] for r in res["scaling"]]))
    out.append(("Gate activations; ms median / min",
                ["backend", "gate", "logits", "time"],
                [[r["backend"], r["gate"], "x".join(map(str, r["shape"])), _ms(r)] for r in res["gates"]]))
    return out


def format_table(title: str, headers: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = [f"#### {title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        return "\n".join(lines) + "\n"
    widths = [max(len(h), *(len(r[k]) for r in rows)) if rows else len(h) for k, h in enumerate(headers)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    """Time against experts and against rank, one line per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, axis, xkey, xlabel in ((axes[0], "experts", "experts", "number of experts (filled: one level; hollow: two levels [n, n])"),
                                   (axes[1], "rank", "rank", "CP rank R")):
        for backend in dict.fromkeys(r["backend"] for r in res["scaling"]):
            pts = [r for r in res["scaling"] if r["backend"] == backend and r["axis"] == axis]
            line = ax.loglog([r[xkey] for r in pts], [r["min_ms"] for r in pts], "o-", label=backend)[0]
            two = [r for r in pts if len(r["expert_dims"]) > 1]  # hollow markers: two expert levels
            ax.loglog([r[xkey] for r in two], [r["min_ms"] for r in two], "o", mfc="white", color=line.get_color())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("forward time, ms (min)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    m = res["meta"]
    axes[0].set_title(f"CP, I=O={m['sizes']['I']}, R={m['sizes']['scaling_rank']}, B={m['sizes']['scaling_batch']}")
    axes[1].set_title(f"CP, N={m['sizes']['scaling_rank_n']}, B={m['sizes']['scaling_batch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(res: dict) -> list[str]:
    """One line per target: met or not, from the rows that state it."""
    lines = []
    for section, label in (("limit", f"planned/limit <= {TARGET_LIMIT} (NumPy, PyTorch)"),
                           ("overhead", f">= {TARGET_UNPLANNED}x faster than unplanned torch.einsum, small batch "
                                        "(contraction per call)"),
                           ("million", f"million-expert planned/limit <= {TARGET_LIMIT}")):
        flags = [r["met"] for r in res[section] if r.get("met") is not None]
        if flags:
            lines.append(f"target {label}: {sum(flags)}/{len(flags)} met")
    flags = [r["memory"]["met"] for r in res["million"] if r["memory"]["met"] is not None]
    if flags:
        lines.append(f"target peak memory O(B*(I+O+R+sum N)+params) (<= {TARGET_MEMORY}x): {sum(flags)}/{len(flags)} met")
    return lines


def meta(args: argparse.Namespace, cfg: dict, backends: list[str]) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:], "quick": args.quick, "backends": backends, "device": args.device, "sizes": cfg,
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "numpy": np.__version__, "tensormoe": getattr(tensormoe, "__version__", None),
    }
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    for mod in ("tensorly", "opt_einsum"):
        info[mod] = __import__(mod).__version__
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                            cwd=str(ROOT)).stdout.strip()
    except OSError:
        info["git_commit"] = None
    if "pytorch" in backends:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    cuda=torch.cuda.get_device_name(0) if args.device == "cuda" else None)
    if "jax" in backends:
        import jax

        info.update(jax=jax.__version__, jax_devices=[str(d) for d in jax.devices()])
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="tensormoe benchmark suite (issue 6)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats, every section (CI)")
    parser.add_argument("--backends", default=None, help="comma-separated (default: every installed backend)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="PyTorch device (JAX: its default)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {list(SECTIONS)}")
    parser.add_argument("--repeats", type=int, default=None, help="samples per timing (default 25; --quick 3)")
    parser.add_argument("--row-budget", type=float, default=3.0,
                        help="seconds of sampling per row; past it a row stops at 3 samples (default 3)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--out", default=None, help="result JSON path (default benchmarks/results/<timestamp>.json)")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = worker(args.worker, json.loads(args.spec))
        if result is not None:
            print(json.dumps(result))
        return 0

    started = time.perf_counter()
    installed = tensormoe.available_backends()
    backends = installed if args.backends is None else [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        if b not in ("numpy", "pytorch", "jax"):
            parser.error(f"--backends: {b!r} is not a backend; expected some of numpy, pytorch, jax")
    skipped = [b for b in backends if b not in installed]
    backends = [b for b in backends if b in installed]
    if "pytorch" in backends:
        import torch

        torch.set_num_threads(args.threads)
        if args.device == "cuda" and not torch.cuda.is_available():
            print("pytorch: --device cuda but no CUDA device here; skipping the pytorch backend")
            skipped.append("pytorch-cuda")
            backends.remove("pytorch")
    elif args.device == "cuda":
        print("--device cuda applies to pytorch only")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    for s in sections:
        if s not in SECTIONS:
            parser.error(f"--sections: {s!r} is not a section; expected some of {list(SECTIONS)}")
    cfg = sizes(args.quick)
    if args.repeats is not None:
        cfg["repeats"] = args.repeats
    cfg["threads"] = args.threads
    ROW_BUDGET_S[0] = cfg["row_budget_s"] = args.row_budget
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_path = Path(args.out) if args.out else HERE / "results" / f"{stamp}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)

    res: dict[str, Any] = {"meta": meta(args, cfg, backends), "skipped_backends": skipped, "verified": [],
                           **{k: [] for k in ("limit", "unplanned", "overhead", "dense", "linear", "million", "scaling", "gates")},
                           "section_seconds": {}}
    for name in backends:
        with tensormoe.backend_context(name):
            be = Backend(name, args.device if name == "pytorch" else "cpu")
            for s in sections:
                t0 = time.perf_counter()
                SECTIONS[s](be, cfg, res)
                res["section_seconds"][f"{be.label}:{s}"] = round(time.perf_counter() - t0, 2)
                print(f"[{time.perf_counter() - started:6.1f} s] {be.label}: {s} done", file=sys.stderr, flush=True)
    if res["scaling"]:
        png = out_path.with_suffix(".png")
        plot(res, png)
        res["plot"] = str(png)
    res["summary"] = summary(res)
    res["wall_seconds"] = round(time.perf_counter() - started, 2)
    out_path.write_text(json.dumps(res, indent=1, default=str))
    m = res["meta"]
    print(f"tensormoe benchmarks: {', '.join(backends) or 'no backend left to run'} on {m['cpu']} ({m['cpu_count']} cores"
          + (f", torch threads {m['torch_threads']}" if "torch_threads" in m else "") + ")"
          + ("  [--quick]" if args.quick else "") + "\n")
    for title, headers, rows in tables(res):
        if rows:
            print(format_table(title, headers, rows, args.markdown))
    for line in res["summary"]:
        print(line)
    print(f"\nwall time {res['wall_seconds']:.1f} s; results: {out_path}" + (f", plot: {res['plot']}" if "plot" in res else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
