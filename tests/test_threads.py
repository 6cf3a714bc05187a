"""The backend flag under threads: contexts stay in their thread; concurrent layers on several backends are correct."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import tensorly as tl
from helpers import BACKENDS, to_numpy

import tensormoe
from tensormoe.ops import get_ops

TIMEOUT = 120  # seconds any thread may take; a hang fails the test instead of blocking the suite


def run_threads(target, n):
    """Run ``target(k)`` in ``n`` threads; re-raise the first error; fail if any thread hangs."""
    errors = []

    def wrapped(k):
        try:
            target(k)
        except BaseException as err:  # noqa: BLE001  (reported to the main thread)
            errors.append(err)

    threads = [threading.Thread(target=wrapped, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if errors:
        raise errors[0]


def test_contexts_in_many_threads_stay_in_their_thread():
    """Threads enter contexts of different backends at once; none sees another's; nothing leaks after exit."""
    for name in BACKENDS:  # load every backend first, so that loading is not what is timed here
        with tensormoe.backend_context(name):
            pass
    n = 2 * len(BACKENDS) + 2
    main_before, tl_global = tensormoe.get_backend(), tl.backend.BackendManager._backend
    inside, after = {}, {}
    entered = threading.Barrier(n + 1, timeout=TIMEOUT)
    release = threading.Barrier(n + 1, timeout=TIMEOUT)

    def worker(k):
        name = BACKENDS[k % len(BACKENDS)]
        with tensormoe.backend_context(name):
            entered.wait()
            release.wait()
            inside[k] = (tensormoe.get_backend(), tl.get_backend())
        after[k] = (tensormoe.get_backend(), tl.get_backend())

    threads = threading.Thread(target=run_threads, args=(worker, n), daemon=True)
    threads.start()
    entered.wait()  # every worker is inside its context now
    during = (tensormoe.get_backend(), tl.get_backend())
    release.wait()
    threads.join(TIMEOUT)
    assert not threads.is_alive()
    assert during == (main_before, tl.get_backend())
    assert inside == {k: (BACKENDS[k % len(BACKENDS)],) * 2 for k in range(n)}
    assert after == {k: (main_before, tl.get_backend()) for k in range(n)}
    assert tensormoe.get_backend() == main_before
    assert tl.backend.BackendManager._backend is tl_global


def test_set_backend_in_main_does_not_override_a_thread_context():
    other = BACKENDS[-1]
    previous = tensormoe.get_backend()
    entered, switched = threading.Event(), threading.Event()
    seen = {}

    def worker(_):
        with tensormoe.backend_context("numpy"):
            entered.set()
            switched.wait(TIMEOUT)
            seen["inside"] = (tensormoe.get_backend(), tl.get_backend())
        seen["after"] = tensormoe.get_backend()

    thread = threading.Thread(target=run_threads, args=(worker, 1), daemon=True)
    thread.start()
    try:
        entered.wait(TIMEOUT)
        tensormoe.set_backend(other)
        switched.set()
        thread.join(TIMEOUT)
    finally:
        tensormoe.set_backend(previous)
    assert seen == {"inside": ("numpy", "numpy"), "after": other}


def test_concurrent_layers_on_different_backends_compute_correctly():
    """Threads share layers and switch backends per call; every result equals the NumPy float64 reference."""
    layers = [
        tensormoe.CPMMoE(6, 4, [5, 3], rank=3),
        tensormoe.TRMMoE(6, 4, [5], ranks=2),
    ]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 6)).astype("float32")
    refs = []
    for layer in layers:
        layer.params = {
            k: (np.asarray(rng.normal(size=v.shape), dtype=layer.dtype) if k.startswith("gate") else v)
            for k, v in layer.params.items()
        }
        refs.append((to_numpy(layer(x)), to_numpy(layer.dense_forward(None, x))))
    for name in BACKENDS:  # convert and compile once up front: the threads then race on the shared caches
        with tensormoe.backend_context(name):
            for layer in layers:
                layer(get_ops().asarray(x, layer.dtype))
    n, rounds = 6, 4

    def worker(k):
        for r in range(rounds):
            name = BACKENDS[(k + r) % len(BACKENDS)]
            with tensormoe.backend_context(name):
                ops = get_ops()
                for layer, (ref, ref_dense) in zip(layers, refs):
                    xb = ops.asarray(x, layer.dtype)
                    y, y_dense = to_numpy(layer(xb)), to_numpy(layer.dense_forward(None, xb))
                    tol = 1e-5 * (1 + np.abs(ref).max())
                    np.testing.assert_allclose(y, ref, atol=tol, err_msg=f"{name} apply")
                    np.testing.assert_allclose(y_dense, ref_dense, atol=tol, err_msg=f"{name} dense_forward")
                assert tensormoe.get_backend() == name == tl.get_backend()

    before = tensormoe.get_backend()
    run_threads(worker, n)
    assert tensormoe.get_backend() == before


def test_first_loads_from_many_threads_keep_jax_float32():
    """Backends loaded for the first time from concurrent threads: each thread gets its own, x64 stays off."""
    code = (
        "import threading, tensormoe, numpy as np\n"
        "names = tensormoe.available_backends()\n"
        "seen, errors = {}, []\n"
        "def work(k):\n"
        "    name = names[k % len(names)]\n"
        "    try:\n"
        "        with tensormoe.backend_context(name):\n"
        "            layer = tensormoe.CPMMoE(4, 3, [5], rank=2)\n"
        "            from tensormoe.ops import get_ops\n"
        "            y = layer(get_ops().asarray(np.ones((2, 4)), 'float32'))\n"
        "            seen[k] = (tensormoe.get_backend(), str(y.dtype).replace('torch.', ''))\n"
        "    except Exception as e:\n"
        "        errors.append(repr(e))\n"
        "threads = [threading.Thread(target=work, args=(k,)) for k in range(2 * len(names))]\n"
        "[t.start() for t in threads]; [t.join(120) for t in threads]\n"
        "x64 = None\n"
        "if 'jax' in names:\n"
        "    import jax; x64 = bool(jax.config.jax_enable_x64)\n"
        "ok = all(seen[k] == (names[k % len(names)], 'float32') for k in range(2 * len(names)))\n"
        "print(errors, ok, x64, tensormoe.get_backend())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "TENSORMOE_BACKEND": "numpy"})
    assert result.returncode == 0, result.stderr
    expected_x64 = False if "jax" in BACKENDS else None
    assert result.stdout.split() == ["[]", "True", str(expected_x64), "numpy"], result.stdout + result.stderr
