"""The tensormoe benchmark suite: every layer against its limit, side by side, on every installed backend.

    python benchmarks/run.py                      # default sizes, every installed backend
    python benchmarks/run.py --quick              # tiny shapes, every section once (CI)
    python benchmarks/run.py --backends pytorch --device cuda --markdown

Sections (each a table; all in one JSON file, ``benchmarks/results/<timestamp>.json``
by default, with a PNG of the scaling plot next to it):

1. ``limit``     planned forward (``layer.apply``, gates included) and forward+backward vs
                 the **limit**: the fastest exact gate written without tensormoe
                 (``benchmarks/limit_gates.py``: the ``entmax`` package, sort and partial-sort
                 thresholds, jitted Newton; each checked exact, the fastest kept), the
                 framework's own LayerNorm and the hand-ordered matmul chain
                 (``benchmarks/chains.py``), checked equal to the layer first; also against the
                 same chain with tensormoe's gates ("same gates") and against the layer's FLOPs
                 at the machine's measured matmul rate;
2. ``unplanned`` vs the same forward through the framework's einsum with defaults
                 (``torch.einsum``; ``jnp.einsum`` eager and jitted; ``tl.einsum`` =
                 ``np.einsum`` without a path, in a subprocess with a timeout);
3. ``dense``     vs the dense reference ``layer.dense_forward`` at growing expert counts;
4. ``linear``    vs a parameter-matched linear layer and a plain ``I x O`` one, forward
                 and forward+backward;
5. ``million``   the million-expert CP layer (``expert_dims=[1024, 1024]``) vs its limit
                 and a linear layer, with its FLOP breakdown and the forward's peak memory;
6. ``scaling``   time and time per FLOP against the number of experts (one and two levels),
                 the batch and the rank, with the limit (PNG);
plus ``gates``:  each gate activation (and the limit's candidates) against softmax;
``peers``:       nn.Linear, lucidrains' mixture-of-experts, PEER, Soft MoE and a path without
                 tensormoe (``torch.einsum`` + the ``entmax`` package) at matched parameters
                 (PyTorch; ``pip install .[peers]``);
``compile``:     ``torch.compile(fullgraph=True)`` of the modules against eager, and what the
                 graph holds;
``firstcall``:   what a first call costs: a new layer (its one plan search) and a new batch size.

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

import chains  # noqa: E402
import limit_gates  # noqa: E402
from chains import limit_forward  # noqa: E402

KINDS = ("cp", "tucker", "tt", "tr")

#: Targets (CPU; issues 6 and 13).
TARGET_LIMIT = 1.25  # planned / limit, every factorization and batch, forward and forward+backward
TARGET_UNPLANNED = 5.0  # unplanned torch.einsum / planned, small batches
TARGET_MEMORY = 4.0
TARGET_GATE = 8.0  # entmax15 / torch.softmax on PyTorch, the four gate shapes
TARGET_FORWARD = 4.5  # default CP layer forward / x @ W (768 x 768), PyTorch, B = 64
TARGET_BACKWARD = 3.5  # its forward+backward / a linear layer's
TARGET_MILLION = 8.0  # million-expert CP forward / x @ W, PyTorch
TARGET_PEERS = {"lucidrains-moe": 1.0, "peer": 1.5}  # tensormoe CP / peer at matched parameters, B = 1024
#: Fast rows keep taking samples (beyond ``--repeats``, up to MAX_SAMPLES) for this many seconds.
MIN_SAMPLING_S = 0.5
MAX_SAMPLES = 400
#: Seconds of sampling per table row before it stops at the minimum of three samples (``--row-budget``).
ROW_BUDGET_S = [3.0]  # measured forward memory / (B*(I+O+R+sum N) + params) elements, as bytes


def sizes(quick: bool) -> dict[str, Any]:
    """Problem sizes of the default run and of ``--quick``."""
    if quick:
        return {
            "I": 32, "O": 32, "N": 16, "batches": [8], "grad_batches": [8], "small_batch": 8,
            "ranks": {"cp": 8, "tucker": [4, 4, 4], "tt": [1, 4, 4, 1], "tr": [2, 4, 4, 2]},
            "repeats": 3, "dense_ns": [16, 64], "dense_cap": 2**17, "dense_repeats": 2, "linear_kinds": ["cp"],
            "linear_batch": 8, "unplanned_kinds": ["cp"], "unplanned_batches": [8], "rss_subprocess": False,
            "unplanned_extras": False, "million": [32, 32], "million_batch": 8, "gate_rank": 4,
            "scaling_ns": [16, [4, 4]], "scaling_batch": 8, "scaling_rank": 4,
            "scaling_batches": [1], "scaling_batch_n": 16, "scaling_batch_rank": 8,
            "scaling_rank_n": 16, "scaling_ranks": [8], "scaling_repeats": 2,
            # JAX compiles every new function and shape: --quick keeps its share small
            "grad_backends": ["pytorch"], "gate_candidates": ["numpy", "pytorch"], "firstcall_backends": ["numpy", "pytorch"],
            "gate_shapes": [[8, 32]], "numpy_timeout": 5.0, "limit_gate_budget": 0.1,
            "overhead_batch": 1, "overhead_ranks": {"cp": 4, "tucker": [2, 2, 2], "tt": [1, 2, 2, 1], "tr": [2, 2, 2, 2]},
            "peers_batches": [8], "peers_dim": 32, "peers_experts": 16, "compile_batches": [1],
            "compile_kinds": ["cp"], "compile_backend": "aot_eager", "firstcall_batch": 64, "firstcall_sizes": 1,
        }
    return {
        "I": 768, "O": 768, "N": 1024, "batches": [1, 64, 1024, 8192], "grad_batches": [1, 64, 1024, 8192],
        "small_batch": 4,
        "ranks": {"cp": 256, "tucker": [64, 64, 64], "tt": [1, 32, 32, 1], "tr": [8, 16, 16, 8]},
        "repeats": 25, "dense_ns": [8, 32, 128, 512], "dense_cap": 2**27, "dense_repeats": 2, "linear_kinds": list(KINDS),
        "linear_batch": 64, "unplanned_kinds": list(KINDS), "unplanned_batches": [64, 4], "rss_subprocess": True,
        "unplanned_extras": True, "million": [1024, 1024], "million_batch": 64, "gate_rank": 64,
        "scaling_ns": [1, 64, 1024, 16384, [16, 16], [64, 64], [256, 256], [1024, 1024]],
        "scaling_batch": 64, "scaling_rank": 64,
        "scaling_batches": [1, 16, 64, 256, 1024, 8192], "scaling_batch_n": 1024, "scaling_batch_rank": 256,
        "scaling_rank_n": 1024, "scaling_ranks": [16, 64, 256, 1024], "scaling_repeats": 5,
        "grad_backends": ["pytorch", "jax"], "gate_candidates": ["numpy", "pytorch", "jax"],
        "firstcall_backends": ["numpy", "pytorch", "jax"],
        "gate_shapes": [[64, 1024], [512, 1024], [64, 16384], [4096, 64]], "numpy_timeout": 2.0,
        "limit_gate_budget": 0.5,
        "overhead_batch": 1, "overhead_ranks": {"cp": 32, "tucker": [16, 16, 16], "tt": [1, 8, 8, 1], "tr": [4, 8, 8, 4]},
        "peers_batches": [64, 1024], "peers_dim": 768, "peers_experts": 1024, "compile_batches": [1, 64],
        "compile_kinds": list(KINDS), "compile_backend": "inductor", "firstcall_batch": 512, "firstcall_sizes": 5,
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


def tensormoe_gates(layer: Any, ops: Any) -> tuple[Callable, Callable]:
    """The layer's activation and LayerNorm from ``tensormoe.gates`` (the "same gates" of the second limit)."""
    from tensormoe import gates

    act = gates.ACTIVATIONS[layer.gate]
    return (lambda z: act(z, ops=ops)), (lambda z: gates.layer_norm(z, ops=ops))


def same_gates_forward(layer: Any, params: dict, x: Any, ops: Any) -> Any:
    """The hand chain with tensormoe's own gates: the limit of the contraction alone."""
    return limit_forward(layer, params, x, *tensormoe_gates(layer, ops))


def unplanned_operands(layer: Any, params: dict, x: Any, ops: Any) -> list[Any]:
    """The forward equation's operands: gates' coefficients (tensormoe's gates), ``[x, 1]``, the factors."""
    xin = ops.concat_ones(x) if layer.bias else x
    coeffs = chains.coefficients(layer, params, x, *tensormoe_gates(layer, ops))
    return [*coeffs, xin, *layer.factorization.gather_params(params, {}, ops)]


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


# -- the limit ------------------------------------------------------------------------------------
class Limits:
    """The honest limit of a layer on a backend: the fastest exact gate candidate, the framework's
    LayerNorm and the hand chain (no tensormoe code); the gate is chosen once per (gate, logits shape)."""

    def __init__(self) -> None:
        self.chosen: dict[tuple, tuple[str, Callable]] = {}
        self.records: list[dict] = []

    def gate(self, be: Backend, layer: Any, p: dict, x: Any, budget: float) -> tuple[str, Callable]:
        if layer.gate == "softmax":
            return "softmax", chains.softmax
        z = x @ p["gate_0"]
        z = chains.layer_norm(z) if layer.gate_norm is not None else z
        key = (be.label, layer.gate, tuple(z.shape))
        if key not in self.chosen:
            timer = lambda fns: time_side_by_side(fns, be, 3, budget_s=budget)  # noqa: E731
            name, fn, record = limit_gates.fastest(be.name, layer.gate, z, be.numpy, timer, COMPILED_GATES[0])
            self.chosen[key] = (name, fn)
            self.records.append({"backend": be.label, "gate": layer.gate, "logits": list(z.shape), "chosen": name,
                                 "candidates": record})
        return self.chosen[key]

    def forward(self, be: Backend, layer: Any, p: dict, x: Any, budget: float) -> tuple[Callable, str]:
        """``limit(p, x)`` (compiled on JAX) and the name of its gate."""
        name, act = self.gate(be, layer, p, x, budget)
        return be.compile(lambda p, x: limit_forward(layer, p, x, act)), name


LIMITS = Limits()
#: Whether the PyTorch limit may also use a torch.compile'd gate (``--compiled-gates``)
COMPILED_GATES = [False]


def matmul_rate(be: Backend, cfg: dict) -> dict[str, float]:
    """The machine's matrix-product rate on this backend: ``x[B, I] @ W[I, O]`` at the largest limit batch."""
    rng = np.random.default_rng(11)
    b = max(cfg["batches"])
    x = be.array(rng.normal(size=(b, cfg["I"])).astype("float32"))
    w = be.array(rng.normal(size=(cfg["I"], cfg["O"])).astype("float32"))
    matmul = be.compile(lambda x, w: x @ w)
    t = time_side_by_side({"matmul": lambda: matmul(x, w)}, be, cfg["repeats"])["matmul"]
    flops = 2 * b * cfg["I"] * cfg["O"]
    return {"shape": [b, cfg["I"], cfg["O"]], "gflops_per_s": flops / (t["min_ms"] * 1e6), **t}


def grad_step(be: Backend, f: Callable, p: dict, x: Any) -> Callable:
    """A call computing the gradients of ``sum(f(p, x))`` with respect to every parameter."""
    if be.name == "pytorch":
        pt = {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}
        first = next(iter(pt))

        def step() -> Any:
            for v in pt.values():
                v.grad = None
            f(pt, x).sum().backward()
            return pt[first].grad

        return step
    import jax

    g = jax.jit(jax.grad(lambda p, x: f(p, x).sum()))
    return lambda: g(p, x)


def _judged(ratio_min: float) -> tuple[str, bool]:
    return f"<= {TARGET_LIMIT}", ratio_min <= TARGET_LIMIT


# -- sections -------------------------------------------------------------------------------
def section_limit(be: Backend, cfg: dict, out: dict) -> None:
    """Section 1: planned forward (and forward+backward) vs the limit, the same-gates chain and the FLOP time."""
    ops = be.ops
    rate = matmul_rate(be, cfg)
    out["matmul_rate"].append({"backend": be.label, **rate})
    flops_per_ms = rate["gflops_per_s"] * 1e6
    for kind in KINDS:
        for batch in cfg["batches"]:
            layer, pn, xn = make_case(kind, cfg["I"], cfg["O"], [cfg["N"]], cfg["ranks"][kind], batch)
            p, x = be.params(pn), be.array(xn)
            limit, gate_name = LIMITS.forward(be, layer, p, x, cfg["limit_gate_budget"])
            same = be.compile(lambda p, x, layer=layer: same_gates_forward(layer, p, x, ops))
            y_planned = be.numpy(layer.apply(p, x))
            out["verified"].append({"backend": be.label, "kind": kind, "batch": batch,
                                    **verify(f"{be.label} {kind} B={batch}", be.numpy(limit(p, x)), y_planned)})
            verify(f"{be.label} {kind} B={batch} same gates", be.numpy(same(p, x)), y_planned)
            fns = {"planned": lambda layer=layer, p=p, x=x: layer.apply(p, x),
                   "limit": lambda limit=limit, p=p, x=x: limit(p, x),
                   "same_gates": lambda same=same, p=p, x=x: same(p, x)}
            t = time_side_by_side(fns, be, cfg["repeats"])
            r = ratio(t["planned"], t["limit"])
            cost = layer.cost(batch)
            flop_ms = cost.flops / flops_per_ms
            target, met = _judged(r["min"])
            row = {
                "backend": be.label, "kind": kind, "ranks": cfg["ranks"][kind], "batch": batch,
                "planned": t["planned"], "limit": t["limit"], "same_gates": t["same_gates"], "ratio": r,
                "same_gates_ratio": ratio(t["planned"], t["same_gates"]), "limit_gate": gate_name,
                "gflops": cost.flops / 1e9, "flop_ms": flop_ms, "vs_flops": t["planned"]["min_ms"] / flop_ms,
                "limit_vs_flops": t["limit"]["min_ms"] / flop_ms, "target": target, "met": met,
            }
            if be.name in cfg["grad_backends"] and batch in cfg["grad_batches"]:
                grads = {"planned": grad_step(be, lambda p, x, layer=layer: layer.apply(p, x), p, x),
                         "limit": grad_step(be, limit, p, x)}
                tb = time_side_by_side(grads, be, cfg["repeats"])
                rb = ratio(tb["planned"], tb["limit"])
                row["backward"] = {"planned": tb["planned"], "limit": tb["limit"], "ratio": rb,
                                   "met": _judged(rb["min"])[1]}
            out["limit"].append(row)


def section_unplanned(be: Backend, cfg: dict, out: dict) -> None:
    """Section 2: planned vs the same forward (same gates) through the framework's einsum with defaults."""
    ops = be.ops
    numpy_rows: list[tuple[dict, dict]] = []
    for kind in cfg["unplanned_kinds"]:
        for batch in cfg["unplanned_batches"]:
            layer, pn, xn = make_case(kind, cfg["I"], cfg["O"], [cfg["N"]], cfg["ranks"][kind], batch)
            p, x = be.params(pn), be.array(xn)
            y_planned = be.numpy(layer.apply(p, x))
            row = {"backend": be.label, "kind": kind, "batch": batch}
            eq = layer.factorization.forward_equation()
            if be.name == "numpy":
                if batch != cfg["small_batch"] and len(cfg["unplanned_batches"]) > 1:
                    continue  # one NumPy attempt per factorization (it times out at realistic sizes)
                row["planned"] = time_side_by_side({"planned": lambda: layer.apply(p, x)}, be, cfg["repeats"])["planned"]
                numpy_rows.append((row, {"kind": kind, "I": cfg["I"], "O": cfg["O"], "dims": [cfg["N"]],
                                         "ranks": cfg["ranks"][kind], "batch": batch}))
                row["target"] = row["met"] = None
                out["unplanned"].append(row)
                continue
            fns = {"planned": lambda layer=layer, p=p, x=x: layer.apply(p, x)}
            if be.name == "pytorch":
                import torch

                einsum = torch.einsum
            else:
                import jax.numpy as jnp

                einsum = jnp.einsum
            fns["unplanned"] = lambda layer=layer, p=p, x=x, eq=eq: einsum(eq, *unplanned_operands(layer, p, x, ops))
            if be.name == "jax" and cfg["unplanned_extras"]:
                jitted = be.compile(lambda p, x, layer=layer, eq=eq: einsum(eq, *unplanned_operands(layer, p, x, ops)))
                fns["unplanned_jit"] = lambda jitted=jitted, p=p, x=x: jitted(p, x)
            if cfg["unplanned_extras"]:  # the contraction alone, operands computed once: cached plan vs the einsum
                operands = unplanned_operands(layer, p, x, ops)
                fns["contract_planned"] = lambda operands=operands, eq=eq, layer=layer: ops.contract(
                    eq, operands, layer.optimize)
                fns["contract_unplanned"] = lambda operands=operands, eq=eq: einsum(eq, *operands)
            for key in [k for k in fns if "unplanned" in k]:
                verify(f"{be.label} {kind} B={batch} {key}", be.numpy(fns[key]()), y_planned)
            t = time_side_by_side(fns, be, cfg["repeats"])
            row.update(planned=t["planned"], unplanned=t["unplanned"], speedup=ratio(t["unplanned"], t["planned"]))
            if "contract_planned" in t:
                row["contraction"] = {"planned": t["contract_planned"], "unplanned": t["contract_unplanned"],
                                      "speedup": ratio(t["contract_unplanned"], t["contract_planned"])}
            if "unplanned_jit" in t:
                row["unplanned_jit"] = t["unplanned_jit"]
                row["speedup_jit"] = ratio(t["unplanned_jit"], t["planned"])
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
    batch = cfg["linear_batch"]
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
    """Forward+backward of the layer and of a linear layer ``x @ w + b`` (gradients w.r.t. the parameters;
    ``torch.nn.Linear``'s computation)."""
    if be.name == "pytorch":
        import torch

        pt = {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}
        wt = w.detach().clone().requires_grad_(True)
        bt = torch.zeros(w.shape[1], dtype=w.dtype, device=w.device, requires_grad=True)

        def layer_step():
            for v in pt.values():
                v.grad = None
            layer.apply(pt, x).sum().backward()
            return pt["factor_0"].grad

        def linear_step():
            wt.grad = bt.grad = None
            torch.nn.functional.linear(x, wt.T, bt).sum().backward()
            return wt.grad

        return {"layer": layer_step, "linear": linear_step}
    if be.name == "jax":
        import jax
        import jax.numpy as jnp

        b = jnp.zeros(w.shape[1], w.dtype)
        g_layer = jax.jit(jax.grad(lambda p, x: layer.apply(p, x).sum()))
        g_linear = jax.jit(jax.grad(lambda wb, x: (x @ wb[0] + wb[1]).sum()))
        return {"layer": lambda: g_layer(p, x), "linear": lambda: g_linear((w, b), x)}
    return {}


def section_linear(be: Backend, cfg: dict, out: dict) -> None:
    """Section 4: each layer vs a parameter-matched linear layer and a plain I x O one."""
    batch = cfg["linear_batch"]
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
        judged = be.name == "pytorch" and kind == "cp"  # the default layer on PyTorch (issue 13)
        row["target"] = f"fwd <= {TARGET_FORWARD}x, fwd+bwd <= {TARGET_BACKWARD}x I x O" if judged else None
        row["met"] = (row["forward_vs_linear"]["min"] <= TARGET_FORWARD
                      and row.get("backward_vs_linear", {"min": 0})["min"] <= TARGET_BACKWARD) if judged else None
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
    limit, gate_name = LIMITS.forward(be, layer, p, x, cfg["limit_gate_budget"])
    same = be.compile(lambda p, x: same_gates_forward(layer, p, x, ops))
    y = be.numpy(layer.apply(p, x))
    out["verified"].append({"backend": be.label, "kind": "cp-million", "batch": batch,
                            **verify(f"{be.label} million", be.numpy(limit(p, x)), y)})
    verify(f"{be.label} million same gates", be.numpy(same(p, x)), y)
    w_io = be.array(np.random.default_rng(3).normal(size=(i, o)).astype("float32"))
    matmul = be.compile(lambda x, w: x @ w)
    fns = {"planned": lambda: layer.apply(p, x), "limit": lambda: limit(p, x), "same_gates": lambda: same(p, x),
           "linear": lambda: matmul(x, w_io)}
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
        "limit_gate": gate_name, "same_gates_ratio": ratio(t["planned"], t["same_gates"]),
        "linear_target": f"planned/linear <= {TARGET_MILLION}" if be.name == "pytorch" else None,
        "linear_met": ratio(t["planned"], t["linear"])["min"] <= TARGET_MILLION if be.name == "pytorch" else None,
    }
    if low is not None:
        row["gate_rank"] = {"gate_rank": cfg["gate_rank"], "vs_linear": ratio(t["gate_rank"], t["linear"]),
                            "vs_full_gates": ratio(t["gate_rank"], t["planned"]), "flops": low.cost(batch).flops}
    out["million"].append(row)


def section_scaling(be: Backend, cfg: dict, out: dict) -> None:
    """Section 6: the CP forward and its limit against the experts (one and two levels), the batch and the rank.

    Each point also gives the time per FLOP against the measured matmul rate (``vs_flops``): flat
    means the layer costs what its arithmetic costs at every size.
    """
    rates = [r for r in out["matmul_rate"] if r["backend"] == be.label]
    flops_per_ms = (rates[0] if rates else matmul_rate(be, cfg))["gflops_per_s"] * 1e6
    points = [("experts", n if isinstance(n, list) else [n], cfg["scaling_rank"], cfg["scaling_batch"])
              for n in cfg["scaling_ns"]]
    points += [("batch", [cfg["scaling_batch_n"]], cfg["scaling_batch_rank"], b) for b in cfg["scaling_batches"]]
    points += [("rank", [cfg["scaling_rank_n"]], r, cfg["scaling_batch"]) for r in cfg["scaling_ranks"]]
    for axis, dims, rank, batch in points:
        layer, pn, xn = make_case("cp", cfg["I"], cfg["O"], dims, rank, batch)
        p, x = be.params(pn), be.array(xn)
        fns = {"planned": lambda: layer.apply(p, x)}
        gate = None
        if axis != "rank" and be.name in cfg["gate_candidates"]:
            limit, gate = LIMITS.forward(be, layer, p, x, cfg["limit_gate_budget"])
            verify(f"{be.label} scaling {dims} B={batch}", be.numpy(limit(p, x)), be.numpy(layer.apply(p, x)))
            fns["limit"] = lambda: limit(p, x)
        t = time_side_by_side(fns, be, cfg["scaling_repeats"])
        flops = layer.cost(batch).flops
        row = {"backend": be.label, "axis": axis, "expert_dims": dims, "levels": len(dims),
               "experts": math.prod(dims), "rank": rank, "batch": batch, **t["planned"], "gflops": flops / 1e9,
               "vs_flops": t["planned"]["min_ms"] / (flops / flops_per_ms)}
        if "limit" in t:
            row.update(limit=t["limit"], limit_gate=gate, ratio=ratio(t["planned"], t["limit"]),
                       limit_vs_flops=t["limit"]["min_ms"] / (flops / flops_per_ms))
        out["scaling"].append(row)


def section_gates(be: Backend, cfg: dict, out: dict) -> None:
    """Each gate activation, tensormoe's threshold methods and the limit's candidates, against softmax."""
    from tensormoe import gates

    rng = np.random.default_rng(5)
    # "auto" and the array methods ("auto" is the kernel where it is built: timing it twice would time the
    # second with a branch predictor warmed by the first)
    methods = ["auto", "sort", "newton"]
    for shape in cfg["gate_shapes"]:
        z = be.array(chains.layer_norm(rng.normal(size=shape)).astype("float32"))  # normalised logits, as in a layer
        fns = {"softmax": lambda f=be.compile(chains.softmax): f(z)}
        for name in ("entmax15", "sparsemax"):
            for m in methods:
                f = be.compile(lambda z, act=gates.ACTIVATIONS[name], m=m: act(z, ops=be.ops, method=m))
                label = f"auto = {gates._resolved_method('auto', be.ops, z, name)}" if m == "auto" else m
                fns[f"{name} ({label})"] = lambda f=f: f(z)
            candidates = limit_gates.candidates(be.name, COMPILED_GATES[0]) if be.name in cfg["gate_candidates"] else {}
            for cand, f in candidates.items():
                if not limit_gates.is_exact(be.numpy(f(z, name)), be.numpy(z), name):
                    continue
                fns[f"{name} [{cand}]"] = lambda f=f, name=name: f(z, name)
        t = time_side_by_side(fns, be, cfg["repeats"])
        for name, v in t.items():
            r = ratio(v, t["softmax"])
            judged = be.name == "pytorch" and name.startswith("entmax15 (auto")
            out["gates"].append({"backend": be.label, "gate": name, "shape": shape, **v, "vs_softmax": r,
                                 "target": f"<= {TARGET_GATE}x softmax" if judged else None,
                                 "met": r["min"] <= TARGET_GATE if judged else None})


# -- peers (PyTorch) --------------------------------------------------------------------------------
def _peer_models(cfg: dict, params: int, tokens: int) -> dict[str, Any]:
    """Peer layers at about ``params`` parameters for sequences of ``tokens`` (None where not installed)."""
    import torch

    d = cfg["peers_dim"]
    models: dict[str, Any] = {"nn.Linear (I x O)": torch.nn.Linear(d, d),
                              "nn.Linear (matched)": torch.nn.Linear(d, max(1, params // d))}
    try:
        from mixture_of_experts import MoE

        experts = 8
        hidden = max(1, round((params - d * experts) / (2 * experts * d)))
        models["lucidrains-moe"] = MoE(dim=d, num_experts=experts, hidden_dim=hidden)
    except ImportError:
        models["lucidrains-moe"] = None
    try:
        from PEER_pytorch import PEER

        n = cfg["peers_experts"]
        models["peer"] = PEER(dim=d, heads=4, num_experts=n, num_experts_per_head=min(16, math.isqrt(n)),
                              dim_key=min(128, d // 2))
    except ImportError:
        models["peer"] = None
    try:
        from soft_moe_pytorch import SoftMoE

        # one slot per token (seq_len): its dispatch and combine grow with the square of the tokens
        models["soft-moe"] = SoftMoE(dim=d, seq_len=tokens, num_experts=2, expert_mult=1)
    except ImportError:
        models["soft-moe"] = None
    return models


def section_peers(be: Backend, cfg: dict, out: dict) -> None:
    """PyTorch: tensormoe's CP layer against peer layers at matched parameters, forward and forward+backward."""
    if be.name != "pytorch":
        return
    import torch

    from tensormoe.torch import CPMMoE

    try:
        import entmax
    except ImportError:  # pip install .[peers]
        entmax = None

    d, n = cfg["peers_dim"], cfg["peers_experts"]
    rank = cfg["ranks"]["cp"]
    torch.manual_seed(0)
    ours = CPMMoE(d, d, [n], rank=rank).to(be.device)
    with torch.no_grad():
        ours.params["gate_0"].normal_(0, d**-0.5)  # random gates: the sparse coefficients do real work
    count = sum(v.numel() for v in ours.parameters())
    eq = ours.layer.factorization.forward_equation()
    p = ours.params

    def unplanned(x: Any) -> Any:
        # what code without tensormoe runs: torch.einsum over the same operands, the entmax package's gate
        a = entmax.entmax15(torch.nn.functional.layer_norm(x @ p["gate_0"], (n,)), dim=-1)
        return torch.einsum(eq, a, torch.nn.functional.pad(x, (0, 1), value=1.0), p["factor_0"], p["factor_1"],
                            p["factor_2"])

    for batch in cfg["peers_batches"]:
        torch.manual_seed(batch)
        models = {"tensormoe CP": ours, **_peer_models(cfg, count, batch)}
        x3 = torch.randn(1, batch, d, device=be.device)  # [batch of one sequence, tokens, dim]
        x2 = x3[0]
        calls: dict[str, Callable] = {}
        for name, m in models.items():
            if m is None:
                continue
            m = m.to(be.device)
            if name == "tensormoe CP" or name.startswith("nn.Linear"):
                calls[name] = lambda m=m: m(x2)
            else:
                calls[name] = lambda m=m: (lambda y: y[0] if isinstance(y, tuple) else y)(m(x3))
        if entmax is not None:
            calls["unplanned (torch.einsum + entmax)"] = lambda: unplanned(x2)
            torch.testing.assert_close(calls["unplanned (torch.einsum + entmax)"](), ours(x2), rtol=2e-3, atol=2e-4)
        with torch.no_grad():
            fwd = time_side_by_side(calls, be, cfg["repeats"])

        def fwd_bwd(f: Callable, model: Any) -> Callable:
            def step() -> Any:
                if model is not None:
                    model.zero_grad(set_to_none=True)
                y = f()
                y.sum().backward()
                return y
            return step

        owners = {**models, "unplanned (torch.einsum + entmax)": ours}
        bwd = time_side_by_side({k: fwd_bwd(f, owners[k]) for k, f in calls.items()}, be, cfg["repeats"])
        base_f, base_b = fwd["nn.Linear (I x O)"], bwd["nn.Linear (I x O)"]
        for name in calls:
            model = owners[name]
            row = {"backend": be.label, "model": name, "batch": batch,
                   "params": sum(v.numel() for v in model.parameters()) if name in models else count,
                   "forward": fwd[name], "backward": bwd[name], "forward_vs_linear": ratio(fwd[name], base_f),
                   "backward_vs_linear": ratio(bwd[name], base_b), "target": None, "met": None}
            if name in TARGET_PEERS and batch == max(cfg["peers_batches"]):
                r = ratio(fwd["tensormoe CP"], fwd[name])
                row.update(ours_vs=r, target=f"tensormoe CP / {name} <= {TARGET_PEERS[name]}",
                           met=r["min"] <= TARGET_PEERS[name])
            out["peers"].append(row)


# -- torch.compile (PyTorch) ------------------------------------------------------------------------
def section_compile(be: Backend, cfg: dict, out: dict) -> None:
    """PyTorch: ``torch.compile(fullgraph=True)`` of each module against eager, and the operators in its graph."""
    if be.name != "pytorch":
        return
    import torch

    import tensormoe.torch as tmt

    classes = {"cp": tmt.CPMMoE, "tucker": tmt.TuckerMMoE, "tt": tmt.TTMMoE, "tr": tmt.TRMMoE}
    linear = torch.nn.Linear(cfg["I"], cfg["O"]).to(be.device)
    for batch in cfg["compile_batches"]:  # the reference: what compiling does to a plain linear layer here
        x = torch.randn(batch, cfg["I"], device=be.device)
        with torch.no_grad():
            torch._dynamo.reset()
            compiled = torch.compile(linear, fullgraph=True, backend=cfg["compile_backend"])
            start = time.perf_counter()
            compiled(x)
            compile_s = time.perf_counter() - start
            t = time_side_by_side({"eager": lambda: linear(x), "compiled": lambda: compiled(x)}, be, cfg["repeats"])
        out["compile"].append({
            "backend": be.label, "kind": "nn.Linear (reference)", "batch": batch, "compiler": cfg["compile_backend"],
            "compile_s": compile_s, "eager": t["eager"], "compiled": t["compiled"],
            "ratio": ratio(t["compiled"], t["eager"]), "kernel_in_graph": None, "einsum_in_graph": None,
            "graph_ops": None, "target": None, "met": None,
        })
    for kind in cfg["compile_kinds"]:
        rank = cfg["ranks"][kind]
        module = (classes[kind](cfg["I"], cfg["O"], [cfg["N"]], rank=rank) if kind == "cp"
                  else classes[kind](cfg["I"], cfg["O"], [cfg["N"]], ranks=rank)).to(be.device)
        with torch.no_grad():
            module.params["gate_0"].normal_(0, cfg["I"] ** -0.5)
        for batch in cfg["compile_batches"]:
            x = torch.randn(batch, cfg["I"], device=be.device)
            seen: list[str] = []

            def recording(gm: Any, inputs: Any) -> Any:
                seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
                return gm.forward

            with torch.no_grad():
                eager = module(x)  # an eager call first: plans the contraction (once for every batch size)
                torch._dynamo.reset()
                torch.compile(module, fullgraph=True, backend=recording)(x)
                torch._dynamo.reset()
                compiled = torch.compile(module, fullgraph=True, backend=cfg["compile_backend"])
                start = time.perf_counter()
                y = compiled(x)
                compile_s = time.perf_counter() - start
                torch.testing.assert_close(y, eager, rtol=1e-4, atol=1e-5)
                t = time_side_by_side({"eager": lambda: module(x), "compiled": lambda: compiled(x)}, be, cfg["repeats"])
            r = ratio(t["compiled"], t["eager"])
            out["compile"].append({
                "backend": be.label, "kind": kind, "batch": batch, "compiler": cfg["compile_backend"],
                "compile_s": compile_s, "eager": t["eager"], "compiled": t["compiled"], "ratio": r,
                "kernel_in_graph": any("sparse_gate" in op for op in seen),
                "einsum_in_graph": any("einsum" in op for op in seen), "graph_ops": len(seen),
                "target": "compiled < eager", "met": r["min"] < 1.0,
            })


# -- first calls ----------------------------------------------------------------------------------------
def section_firstcall(be: Backend, cfg: dict, out: dict) -> None:
    """What a first call costs: a new layer (its one plan search and timing) and then a new batch size.

    Single calls are noisy on a shared machine, so "a new batch size" is the fastest of the first
    calls at several new sizes (five; one on JAX), and "steady" the fastest of five repeated calls at
    the last of them.
    """
    from tensormoe import contraction

    if be.name not in cfg["firstcall_backends"]:
        return
    b = cfg["firstcall_batch"]
    # JAX compiles each new shape (seconds): one new size there
    sizes_ = [b + k for k in range(1, 1 + (1 if be.name == "jax" else cfg["firstcall_sizes"]))]
    for kind in KINDS:
        layer, pn, xn = make_case(kind, cfg["I"], cfg["O"], [cfg["N"]], cfg["ranks"][kind], sizes_[-1])
        p = be.params(pn)
        xs = {rows: be.array(xn[:rows]) for rows in (b, *sizes_)}

        def once(rows: int) -> float:
            start = time.perf_counter()
            be.sync(layer.apply(p, xs[rows]))
            return 1e3 * (time.perf_counter() - start)

        contraction.clear_cache()
        new_layer = once(b)
        searches = contraction.cache_info()["misses"]
        again = min(once(b) for _ in range(5))
        new_batch = min(once(rows) for rows in sizes_)
        searches = contraction.cache_info()["misses"] - searches  # plan searches the new sizes caused
        steady = min(once(sizes_[-1]) for _ in range(5))
        judged = be.name != "jax"  # on JAX a new shape is a new trace and XLA compilation, whatever the plan
        out["firstcall"].append({
            "backend": be.label, "kind": kind, "batch": b,
            "ms": {"new layer": new_layer, "again": again, "new batch size": new_batch, "steady": steady},
            "new_layer_extra_ms": new_layer - again, "new_batch_extra_ms": new_batch - steady,
            "new_batch_searches": searches,
            "target": "new batch size: < 20 ms extra (plan search and timing)" if judged else None,
            "met": new_batch - steady < 20 if judged else None,
        })


SECTIONS = {"limit": section_limit, "unplanned": section_unplanned, "overhead": section_overhead,
            "dense": section_dense, "linear": section_linear, "million": section_million, "scaling": section_scaling,
            "gates": section_gates, "peers": section_peers, "compile": section_compile,
            "firstcall": section_firstcall}


# -- reporting ---------------------------------------------------------------------------------
def _ms(t: dict | None) -> str:
    return "-" if t is None else f"{t['median_ms']:.3g} / {t['min_ms']:.3g}"


def _x(r: dict | None, key: str = "min") -> str:
    return "-" if r is None or r.get(key) is None else f"{r[key]:.2f}x"


def _met(v: Any) -> str:
    return "" if v is None else ("yes" if v else "NO")


def _yes(v: bool | None) -> str:
    return "-" if v is None else ("yes" if v else "no")


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def _bwd(r: dict) -> tuple[str, str, str]:
    b = r.get("backward")
    if not b:
        return "-", "-", ""
    return _ms(b["planned"]), _ms(b["limit"]), f"{_x(b['ratio'])} {_met(b['met'])}"


def tables(res: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """Every section as (title, headers, rows) of strings."""
    out = []
    out.append(("Matrix-product rate (x @ W, float32): the FLOP time of the tables below",
                ["backend", "shape", "ms median / min", "GFLOP/s"],
                [[r["backend"], "x".join(map(str, r["shape"])), _ms(r), f"{r['gflops_per_s']:.1f}"]
                 for r in res.get("matmul_rate", [])]))
    out.append(("1. Planned forward vs the limit (fastest exact gate without tensormoe + framework LayerNorm + hand "
                "chain); times ms median / min",
                ["backend", "layer", "B", "planned", "limit (its gate)", "planned/limit", "met",
                 "same gates: planned/that", "planned / FLOP time", "fwd+bwd planned", "fwd+bwd limit",
                 "fwd+bwd planned/limit, met"],
                [[r["backend"], r["kind"], str(r["batch"]), _ms(r["planned"]),
                  f"{_ms(r['limit'])} ({r['limit_gate']})", f"{_x(r['ratio'])} ({_x(r['ratio'], 'median')})",
                  _met(r["met"]), _x(r["same_gates_ratio"]), f"{r['vs_flops']:.2f}x", *_bwd(r)]
                 for r in res["limit"]]))
    rows = []
    for r in res["unplanned"]:
        unpl = _ms(r["unplanned"]) if r["unplanned"] is not None else f">{r['timeout_s']:.0f} s (timed out)"
        speed = _x(r["speedup"]) if r["speedup"]["min"] is not None else f">{1e3 * r['timeout_s'] / r['planned']['min_ms']:.0f}x"
        jit = f"{_ms(r['unplanned_jit'])} ({_x(r['speedup_jit'])})" if "unplanned_jit" in r else ""
        c = r.get("contraction")
        alone = f"{_ms(c['planned'])} vs {_ms(c['unplanned'])} ({_x(c['speedup'])})" if c else ""
        rows.append([r["backend"], r["kind"], str(r["batch"]), _ms(r["planned"]), unpl, speed, jit, alone])
    out.append(("2. Planned vs unplanned einsum with defaults (same gates); speed-up = unplanned/planned (min)",
                ["backend", "layer", "B", "planned", "unplanned", "speed-up", "unplanned jit (speed-up)",
                 "contraction alone: planned vs unplanned (speed-up)"],
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
    out.append(("4. Layer vs parameter-matched linear (x @ W[I, params/I]) and I x O linear; forward x @ W, "
                "forward+backward x @ W + b (nn.Linear); ratios layer/linear (min)",
                ["backend", "layer", "B", "params", "fwd layer", "fwd matched", "fwd IxO", "fwd /matched", "fwd /IxO",
                 "fwd+bwd layer", "fwd+bwd /matched", "fwd+bwd /IxO", "target", "met"],
                [[r["backend"], r["kind"], str(r["batch"]), f"{r['params']:,}", _ms(r["forward"]["layer"]),
                  _ms(r["forward"]["matched"]), _ms(r["forward"]["linear"]), _x(r["forward_vs_matched"]),
                  _x(r["forward_vs_linear"]), _ms(r.get("backward", {}).get("layer")), _x(r.get("backward_vs_matched")),
                  _x(r.get("backward_vs_linear")), r.get("target") or "", _met(r.get("met"))] for r in res["linear"]]))
    rows = []
    for r in res["million"]:
        f, m = r["flops"], r["memory"]
        rows.append([
            r["backend"], f"{r['expert_dims']} = {r['experts']:,}", str(r["rank"]), str(r["batch"]),
            _ms(r["times"]["planned"]), f"{_ms(r['times']['limit'])} ({r['limit_gate']})", _x(r["vs_limit"]),
            _met(r["met"]), _x(r["same_gates_ratio"]), _ms(r["times"]["linear"]),
            f"{_x(r['vs_linear'])} {_met(r.get('linear_met'))}",
            f"{f['total_over_linear']:.1f}x linear, {100 * f['gate_share']:.0f}% in gates",
            (f"{_x(r['gate_rank']['vs_linear'])} (r={r['gate_rank']['gate_rank']})" if "gate_rank" in r else "n/a"),
            f"{_bytes(m['bytes'])} ({m['over_bound']:.2f}x bound {_bytes(m['bound_bytes'])}) {_met(m['met'])}"
            if m["bytes"] is not None else "-",
            _bytes(r["dense_w_bytes"]),
        ])
    out.append(("5. Million-expert CP layer vs its limit and the I x O linear layer",
                ["backend", "experts", "R", "B", "planned", "limit (its gate)", "planned/limit", "<= 1.25 met",
                 "same gates: planned/that", "linear", f"planned/linear (<= {TARGET_MILLION}, PyTorch)", "FLOPs",
                 "gate_rank: /linear", "forward peak memory (vs bound), met", "dense W"],
                rows))
    out.append(("6. Scaling of the CP forward (planned, gates included) and its limit; FLOP time = FLOPs / matmul rate",
                ["backend", "axis", "expert_dims", "R", "B", "planned ms median / min", "limit ms (its gate)",
                 "planned/limit", "planned / FLOP time", "limit / FLOP time", "GFLOP"],
                [[r["backend"], r["axis"], str(r["expert_dims"]), str(r["rank"]), str(r["batch"]), _ms(r),
                  f"{_ms(r.get('limit'))} ({r.get('limit_gate')})" if "limit" in r else "-", _x(r.get("ratio")),
                  f"{r['vs_flops']:.2f}x", f"{r['limit_vs_flops']:.2f}x" if "limit_vs_flops" in r else "-",
                  f"{r['gflops']:.3g}"] for r in res["scaling"]]))
    out.append(("Gate activations on normalised logits: tensormoe (method) and the limit's candidates [name]; "
                "ms median / min",
                ["backend", "logits", "gate", "time", "/ softmax (min)", "target", "met"],
                [[r["backend"], "x".join(map(str, r["shape"])), r["gate"], _ms(r), _x(r["vs_softmax"]),
                  r["target"] or "", _met(r["met"])] for r in res["gates"]]))
    out.append(("Peers at matched parameters (PyTorch): forward (no_grad) and forward+backward; ratios / nn.Linear I x O",
                ["backend", "model", "params", "B", "fwd", "fwd / linear", "fwd+bwd", "fwd+bwd / linear",
                 "target", "met"],
                [[r["backend"], r["model"], f"{r['params']:,}", str(r["batch"]), _ms(r["forward"]),
                  _x(r["forward_vs_linear"]), _ms(r["backward"]), _x(r["backward_vs_linear"]),
                  (f"{r['target']} ({_x(r['ours_vs'])})" if r["target"] else ""), _met(r["met"])]
                 for r in res.get("peers", [])]))
    out.append(("torch.compile(fullgraph=True) of the modules against eager",
                ["backend", "layer", "B", "compiler", "compile s", "eager", "compiled", "compiled/eager",
                 "kernel in graph", "einsum in graph", "met"],
                [[r["backend"], r["kind"], str(r["batch"]), r["compiler"], f"{r['compile_s']:.1f}", _ms(r["eager"]),
                  _ms(r["compiled"]), _x(r["ratio"]), _yes(r["kernel_in_graph"]), _yes(r["einsum_in_graph"]),
                  _met(r["met"])] for r in res.get("compile", [])]))
    out.append(("First calls (ms): a new layer plans once; a new batch size (B+1, ..., fastest of five) reuses its plan",
                ["backend", "layer", "B", "new layer", "again (min of 5)", "new batch size", "steady (min of 5)",
                 "extra of a new batch size", "met"],
                [[r["backend"], r["kind"], str(r["batch"]), *(f"{r['ms'][k]:.1f}" for k in
                  ("new layer", "again", "new batch size", "steady")), f"{r['new_batch_extra_ms']:.1f}",
                  _met(r["met"])] for r in res.get("firstcall", [])]))
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


def _count(v: float, _: Any = None) -> str:
    """A readable tick label for a count: 1, 64, 1k (1024), 16k, 1M (2**20)."""
    for unit, size in (("M", 2**20), ("k", 2**10)):
        if v >= size and v % size == 0:
            return f"{int(v) // size}{unit}"
    return f"{v:g}"


def plot(res: dict, path: Path) -> None:
    """Forward time against the experts (one and two levels), the batch and the rank: tensormoe and its limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator

    m = res["meta"]["sizes"]
    panels = (
        ("experts", "experts", "experts N (all levels together)",
         f"CP, I = O = {m['I']}, R = {m['scaling_rank']}, B = {m['scaling_batch']}"),
        ("batch", "batch", "batch B (rows)", f"CP, N = {m['scaling_batch_n']}, R = {m['scaling_batch_rank']}"),
        ("rank", "rank", "CP rank R", f"CP, N = {m['scaling_rank_n']}, B = {m['scaling_batch']}"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    backends = list(dict.fromkeys(r["backend"] for r in res["scaling"]))
    colors = {b: f"C{k}" for k, b in enumerate(backends)}
    for ax, (axis, xkey, xlabel, title) in zip(axes, panels):
        pts = [r for r in res["scaling"] if r["axis"] == axis]
        ticks = sorted({r[xkey] for r in pts})
        for backend in backends:
            for levels, marker in ((1, "o"), (2, "s")):
                series = sorted((r for r in pts if r["backend"] == backend and r["levels"] == levels),
                                key=lambda r: r[xkey])
                if not series:
                    continue
                name = backend if axis != "experts" else f"{backend}, {'one level' if levels == 1 else 'two levels'}"
                xs = [r[xkey] for r in series]
                ax.loglog(xs, [r["min_ms"] for r in series], marker=marker, linestyle="-", color=colors[backend],
                          label=f"{name}: tensormoe")
                if all("limit" in r for r in series):
                    ax.loglog(xs, [r["limit"]["min_ms"] for r in series], marker=marker, linestyle="--",
                              mfc="white", color=colors[backend], label=f"{name}: limit")
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(_count))
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("forward time (ms, minimum of samples)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"tensormoe forward (gates included) and its limit, {res['meta'].get('cpu', '')}, "
                 f"{res['meta'].get('cpu_count')} cores"
                 + (f", torch threads {res['meta']['torch_threads']}" if "torch_threads" in res["meta"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(res: dict) -> list[str]:
    """One line per target: met or not, from the rows that state it."""
    lines = []

    def count(label: str, flags: list) -> None:
        flags = [f for f in flags if f is not None]
        if flags:
            lines.append(f"target {label}: {sum(flags)}/{len(flags)} met")

    count(f"planned/limit <= {TARGET_LIMIT}, forward (every backend, format, batch)", [r["met"] for r in res["limit"]])
    count(f"planned/limit <= {TARGET_LIMIT}, forward+backward",
          [r["backward"]["met"] for r in res["limit"] if "backward" in r])
    count(f">= {TARGET_UNPLANNED}x faster than unplanned torch.einsum, small batch (contraction per call)",
          [r["met"] for r in res["overhead"]])
    count(f"million-expert planned/limit <= {TARGET_LIMIT}", [r["met"] for r in res["million"]])
    count(f"million-expert planned / x @ W <= {TARGET_MILLION} (PyTorch)", [r.get("linear_met") for r in res["million"]])
    count(f"peak memory O(B*(I+O+R+sum N)+params) (<= {TARGET_MEMORY}x)",
          [r["memory"]["met"] for r in res["million"]])
    count(f"default CP forward <= {TARGET_FORWARD}x x @ W and forward+backward <= {TARGET_BACKWARD}x linear "
          "(PyTorch)", [r.get("met") for r in res["linear"]])
    count(f"entmax15 <= {TARGET_GATE}x torch.softmax", [r["met"] for r in res["gates"]])
    count("peers at matched parameters, B = max (faster than lucidrains' MoE, within 1.5x of PEER)",
          [r["met"] for r in res.get("peers", [])])
    count("torch.compile(fullgraph=True) faster than eager", [r["met"] for r in res.get("compile", [])])
    count("torch.compile graph holds the kernel and no einsum",
          [r["kernel_in_graph"] and not r["einsum_in_graph"] for r in res.get("compile", [])
           if r["kernel_in_graph"] is not None])
    count("first call at a new batch size: < 20 ms of plan search and timing", [r["met"] for r in res.get("firstcall", [])])
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
    parser.add_argument("--compiled-gates", action="store_true",
                        help="also try a torch.compile'd Newton gate for the PyTorch limit (compiles for seconds)")
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
    COMPILED_GATES[0] = cfg["compiled_gates"] = args.compiled_gates
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_path = Path(args.out) if args.out else HERE / "results" / f"{stamp}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)

    res: dict[str, Any] = {"meta": meta(args, cfg, backends), "skipped_backends": skipped, "verified": [],
                           **{k: [] for k in ("matmul_rate", "limit", "unplanned", "overhead", "dense", "linear",
                                              "million", "scaling", "gates", "peers", "compile", "firstcall")},
                           "section_seconds": {}}
    for name in backends:
        with tensormoe.backend_context(name):
            be = Backend(name, args.device if name == "pytorch" else "cpu")
            for s in sections:
                t0 = time.perf_counter()
                SECTIONS[s](be, cfg, res)
                res["section_seconds"][f"{be.label}:{s}"] = round(time.perf_counter() - t0, 2)
                print(f"[{time.perf_counter() - started:6.1f} s] {be.label}: {s} done", file=sys.stderr, flush=True)
    res["limit_gates"] = LIMITS.records
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
