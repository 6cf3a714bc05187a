"""The one backend flag: defaults, contexts, threads, lazy imports, TensorLy pitfalls."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import tensorly as tl

import tensormoe
from tensormoe import backend as backend_module

from helpers import BACKENDS


def run_python(code: str, **env: str) -> str:
    import os

    environment = {**os.environ, **env}
    environment.pop("TENSORMOE_BACKEND", None) if "TENSORMOE_BACKEND" not in env else None
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_does_not_import_frameworks():
    out = run_python("import sys, tensormoe; print('torch' in sys.modules, 'jax' in sys.modules)")
    assert out == "False False"


@pytest.mark.parametrize("name", BACKENDS)
def test_environment_variable_sets_default(name):
    out = run_python("import tensormoe; print(tensormoe.get_backend())", TENSORMOE_BACKEND=name)
    assert out == name


def test_environment_variable_unknown_is_a_clear_error():
    code = (
        "import tensormoe\n"
        "try:\n    tensormoe.get_backend()\nexcept ValueError as e:\n    print(e)\n"
    )
    out = run_python(code, TENSORMOE_BACKEND="tensorflow")
    assert "TENSORMOE_BACKEND='tensorflow'" in out and "numpy" in out


def test_default_is_numpy_without_environment():
    assert run_python("import tensormoe; print(tensormoe.get_backend())") == "numpy"


@pytest.mark.parametrize("bad", ["tensorflow", "", "cupy"])
def test_unknown_backend_names_argument_and_choices(bad):
    with pytest.raises(ValueError, match=r"backend=.*expected one of \['jax', 'numpy', 'pytorch'\]"):
        tensormoe.set_backend(bad)
    with pytest.raises(ValueError, match="backend="):
        with tensormoe.backend_context(bad):
            pass


def test_backend_name_must_be_a_string():
    with pytest.raises(TypeError, match="backend must be a string"):
        tensormoe.set_backend(3)


def test_missing_framework_names_the_extra(monkeypatch):
    monkeypatch.setattr(backend_module, "_loaded", set())
    real = backend_module.importlib.util.find_spec
    monkeypatch.setattr(
        backend_module.importlib.util, "find_spec", lambda name, *a: None if name == "jax" else real(name, *a)
    )
    with pytest.raises(tensormoe.BackendNotAvailableError, match=r"pip install 'tensormoe\[jax\]'"):
        tensormoe.set_backend("jax")


def test_torch_alias():
    if "pytorch" not in BACKENDS:
        pytest.skip("torch not installed")
    with tensormoe.backend_context("torch") as name:
        assert name == "pytorch" == tensormoe.get_backend()


@pytest.mark.parametrize("name", BACKENDS)
def test_context_restores_this_thread_and_tensorly(name):
    before, tl_before = tensormoe.get_backend(), tl.get_backend()
    with tensormoe.backend_context(name):
        assert tensormoe.get_backend() == name
        assert tl.get_backend() == name
    assert tensormoe.get_backend() == before
    assert tl.get_backend() == tl_before


def test_nested_contexts_restore_in_order():
    inner = BACKENDS[-1]
    with tensormoe.backend_context("numpy"):
        with tensormoe.backend_context(inner):
            assert tensormoe.get_backend() == inner
        assert tensormoe.get_backend() == "numpy"


def test_context_in_worker_thread_does_not_leak():
    """TensorLy's own backend_context leaks a worker's backend into the global default; ours must not."""
    other = BACKENDS[-1]
    main_before, tl_global_before = tensormoe.get_backend(), tl.backend.BackendManager._backend
    seen = {}
    entered, release = threading.Event(), threading.Event()

    def worker():
        with tensormoe.backend_context(other):
            seen["inside"] = tensormoe.get_backend()
            entered.set()
            release.wait(10)
        seen["after"] = tensormoe.get_backend()

    t = threading.Thread(target=worker)
    t.start()
    entered.wait(10)
    seen["main_during"] = tensormoe.get_backend()
    release.set()
    t.join()
    assert seen == {"inside": other, "main_during": main_before, "after": main_before}
    assert tensormoe.get_backend() == main_before
    assert tl.backend.BackendManager._backend is tl_global_before


def test_set_backend_changes_process_default_and_tensorly():
    previous = tensormoe.get_backend()
    other = BACKENDS[-1]
    try:
        tensormoe.set_backend(other)
        assert tensormoe.get_backend() == other
        assert tl.get_backend() == other
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("b", tensormoe.get_backend()))
        t.start()
        t.join()
        assert result["b"] == other
    finally:
        tensormoe.set_backend(previous)


def test_jax_backend_does_not_switch_process_to_float64():
    if "jax" not in BACKENDS:
        pytest.skip("jax not installed")
    code = (
        "import tensormoe, numpy as np\n"
        "tensormoe.set_backend('jax')\n"
        "import jax, jax.numpy as jnp, tensorly as tl\n"
        "layer = tensormoe.CPMMoE(4, 3, [5], rank=2)\n"
        "y = layer(jnp.ones((2, 4)))\n"
        "print(jax.config.jax_enable_x64, jnp.ones(1).dtype, y.dtype, tl.get_backend())\n"
    )
    assert run_python(code) == "False float32 float32 jax"


def test_available_backends_lists_installed():
    assert "numpy" in tensormoe.available_backends()
    assert set(tensormoe.available_backends()) <= {"numpy", "pytorch", "jax"}
