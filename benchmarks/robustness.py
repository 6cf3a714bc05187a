"""Numbers quoted in docs/guides/robustness.md: rounding errors per dtype, the cost of validation, hostile files.

    PYTHONPATH=. python benchmarks/robustness.py errors      # the tolerance table
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/robustness.py overhead    # microseconds per call
    PYTHONPATH=. python benchmarks/robustness.py files 3000 [SEED]  # hostile files under a memory cap
    PYTHONPATH=. python benchmarks/robustness.py io          # loading a 36 MB weights file: seconds, memory

Both print markdown tables.  ``overhead`` only times calls, so it also runs
against an older checkout of tensormoe (``PYTHONPATH=/path/to/old``) for a
before/after comparison in the same session.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import tensormoe
from tensormoe.frameworks import get_ops

DTYPES = {
    "numpy": ["float16", "float32", "float64"],
    "pytorch": ["float16", "bfloat16", "float32", "float64"],
    "jax": ["float16", "bfloat16", "float32"],
}


def _np(x):
    name = type(x).__module__.split(".")[0]
    if name == "torch":
        return x.detach().float().cpu().numpy().astype(np.float64) if str(x.dtype) == "torch.bfloat16" else \
            x.detach().cpu().numpy().astype(np.float64)
    return np.asarray(x.astype("float32") if str(x.dtype) == "bfloat16" else x, dtype=np.float64)


def errors() -> None:
    from tensormoe.numerics import forward_error_bound, rounding_count, unit_roundoff

    layers = {
        "CP R=16": lambda dt: tensormoe.CPMMoE(64, 64, [16], rank=16, dtype=dt),
        "Tucker [8,16,16]": lambda dt: tensormoe.TuckerMMoE(64, 64, [16], ranks=[8, 16, 16], dtype=dt),
        "TT r=8": lambda dt: tensormoe.TTMMoE(64, 64, [16], ranks=8, dtype=dt),
        "TR r=4": lambda dt: tensormoe.TRMMoE(64, 64, [16], ranks=4, dtype=dt),
    }
    print("| layer | backend | dtype | n | gamma_n | max err / S (apply vs exact) | max err / S (apply vs dense) "
          "| max rel. err (apply vs exact) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, make in layers.items():
        for backend in tensormoe.available_backends():
            for dtype in DTYPES[backend]:
                with tensormoe.backend_context(backend):
                    ops = get_ops()
                    layer = make(dtype)
                    rng = np.random.default_rng(0)
                    x = ops.asarray(rng.normal(size=(64, 64)), dtype)
                    a = [ops.asarray(rng.dirichlet(np.ones(16), size=64), dtype)]
                    y, y_dense = _np(layer(x, a)), _np(layer.dense_forward(None, x, a))
                    bound = forward_error_bound(layer, None, x, a)
                    params64 = {k: _np(v) for k, v in layer.params.items()}
                x64, a64 = _np(x), _np(a[0])
                with tensormoe.backend_context("numpy"):
                    weight = layer.factorization.to_dense(params64)
                xin = np.concatenate([x64, np.ones((64, 1))], axis=-1)
                exact = np.einsum("bn,bi,nio->bo", a64, xin, weight)
                n, u = rounding_count(layer), unit_roundoff(dtype)
                gamma = n * u / (1 - n * u)
                s = bound / gamma
                relative = np.max(np.abs(y - exact)) / np.max(np.abs(exact))
                print(f"| {label} | {backend} | {dtype} | {n} | {gamma:.2e} | {np.max(np.abs(y - exact) / s):.2e} "
                      f"| {np.max(np.abs(y - y_dense) / s):.2e} | {relative:.2e} |")


def _time(fn, repeat=9, number=300) -> float:
    """Microseconds per call: the fastest of ``repeat`` runs of ``number`` calls, in process CPU time
    (robust to other processes sharing the machine; every framework runs on one thread)."""
    fn()
    runs = []
    for _ in range(repeat):
        start = time.process_time()
        for _ in range(number):
            fn()
        runs.append((time.process_time() - start) / number)
    return min(runs) * 1e6


def overhead() -> None:
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    print("| backend | layer | call | microseconds per call |")
    print("| --- | --- | --- | --- |")
    for backend in [b for b in tensormoe.available_backends() if b != "jax"]:
        with tensormoe.backend_context(backend):
            ops = get_ops()
            for label, layer, batch in [
                ("CP 8->8, N=4, R=2, B=1", tensormoe.CPMMoE(8, 8, [4], rank=2), 1),
                ("CP 256->256, N=64, R=32, B=32", tensormoe.CPMMoE(256, 256, [64], rank=32), 32),
            ]:
                x = ops.asarray(np.ones((batch, layer.in_dim)), "float32")
                params = layer.params
                print(f"| {backend} | {label} | layer(x) | {_time(lambda: layer(x)):.1f} |")
                print(f"| {backend} | {label} | layer.apply(params, x) | {_time(lambda: layer.apply(params, x)):.1f} |")
                if hasattr(layer, "_checked") and hasattr(tensormoe, "validation"):
                    # the checks alone (this branch): the call's arguments, each gate's logits, the plan's operands
                    from tensormoe.routing import gates

                    z = ops.asarray(np.ones((batch, layer.expert_dims[0])), "float32")
                    plan = layer.plan(batch)
                    operands = [z, ops.concat_ones(x), *(params[k] for k in layer.factorization.network())]
                    shapes_ok = lambda: all(tuple(o.shape) == s for o, s in zip(operands, plan.shapes))  # noqa: E731
                    own = _time(lambda: layer._checked(None, x))
                    print(f"| {backend} | {label} | checks of layer(x) | {own:.1f} |")
                    print(f"| {backend} | {label} | checks of layer.apply(params, x) | "
                          f"{_time(lambda: layer._checked(params, x)):.1f} |")
                    print(f"| {backend} | {label} | checks of one gate's logits (x2 per level) | "
                          f"{_time(lambda: gates._checked_ops(z, ops)):.1f} |")
                    print(f"| {backend} | {label} | check of the plan's operand shapes | {_time(shapes_ok):.1f} |")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def files(examples: str = "3000", *seed: str) -> None:
    """Run the capped hostile-file fuzz of tests/test_file_fuzz.py with ``examples`` cases; print its tables.

    The cases are the test's fixed ones; a further argument, an integer seed, draws others.
    """
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory() as folder:
        out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "test_file_fuzz.py"), "--child", folder,
                              examples, *seed], capture_output=True, text=True, env=env, check=True)
    s = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 2**20
    print(f"{s['examples']} generated files ({s['calls']} loader calls, {s['accepted_calls']} of them loading a file "
          f"that another reader reads the same), backends {s['backends']}, {s['seconds']} s; address space capped at "
          f"{s['cap_bytes'] / mib:.0f} MiB ({s['headroom_bytes'] / mib:.0f} MiB above the warmed-up process); peak RSS "
          f"{s['rss_peak_bytes'] / mib:.0f} MiB, {s['rss_growth_bytes'] / mib:.1f} MiB above the warm-up; slowest "
          f"call {s['slowest_call_s'] * 1000:.0f} ms\n")
    print("| kind of file | cases |\n| --- | --- |")
    for kind, count in s["kinds"].items():
        if kind != "issue":
            print(f"| {kind} | {count} |")
    print("\n| input | answer |\n| --- | --- |")
    for case in s["issue_cases"]:
        message = case["message"].split("': ", 1)[-1] if case["message"].startswith("cannot load") else case["message"]
        print(f"| {case['case']} | `{case['error']}: {message[:160]}...` |")


_LOAD = """
import resource, sys, time
from tensormoe import io
before = int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1])
start = time.perf_counter()
io.layer_from_file(sys.argv[1], backend="numpy")
print(time.perf_counter() - start, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def io_cost() -> None:
    """Save and rebuild (``layer_from_file``, a fresh process each) a CP layer of 8.9 M float32 parameters.

    ``LOAD_WITH=/path/to/other/checkout`` loads with another tensormoe (before/after comparisons of ``.npz``).
    """
    from tensormoe import io

    layer = tensormoe.CPMMoE(768, 768, [4096], rank=1024)
    size = sum(v.nbytes for v in layer.params.values())
    print(f"CP 768->768, N=4096, R=1024: {layer.n_params:,} parameters, {size / 2**20:.1f} MiB\n")
    print("| file | size (MiB) | save (s) | layer_from_file (s, median of 3 processes) | peak RSS growth (MiB) |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as folder:
        for suffix in (".safetensors", ".npz"):
            path = os.path.join(folder, "w" + suffix)
            start = time.perf_counter()
            io.save(layer, path)
            saved = time.perf_counter() - start
            runs = [subprocess.run([sys.executable, "-c", _LOAD, path], capture_output=True, text=True, cwd=folder,
                                   check=suffix == ".npz" or "LOAD_WITH" not in os.environ,
                                   env={**os.environ, "PYTHONPATH": os.environ.get("LOAD_WITH", ROOT)}).stdout.split()
                    for _ in range(3)]
            if not all(runs):
                print(f"| {suffix} | {os.path.getsize(path) / 2**20:.1f} | {saved:.2f} | not readable there | |")
                continue
            seconds = statistics.median(float(r[0]) for r in runs)
            growth = statistics.median(int(r[1]) for r in runs) / 2**20
            print(f"| {suffix} | {os.path.getsize(path) / 2**20:.1f} | {saved:.2f} | {seconds:.2f} | {growth:.0f} |")


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "errors"
    {"errors": errors, "overhead": overhead, "files": files, "io": io_cost}[mode](*sys.argv[2:])
