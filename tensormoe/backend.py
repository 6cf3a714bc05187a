"""The one backend flag.

tensormoe computes on NumPy, PyTorch or JAX.  Which one is chosen by a single flag:

* the ``TENSORMOE_BACKEND`` environment variable gives the process default
  (``"numpy"`` when unset);
* :func:`set_backend` changes the process default;
* :func:`backend_context` changes it for the current thread only, and restores
  exactly what was there before on exit.

The flag also drives TensorLy's backend (used to reconstruct dense weight
tensors and for decompositions).  Two TensorLy pitfalls are guarded here:
``tl.backend_context`` restores with a global ``set_backend`` (leaking a worker
thread's backend into the process default), and importing TensorLy's JAX backend
switches JAX to float64 for the whole process.  This module only ever touches
TensorLy's *thread-local* slot inside a context, and restores JAX's ``x64``
setting after TensorLy's JAX backend is imported.

No framework is imported until its backend is asked for.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import threading
from collections.abc import Iterator

__all__ = [
    "BACKENDS",
    "BackendNotAvailableError",
    "available_backends",
    "backend_context",
    "get_backend",
    "set_backend",
]

BACKENDS: dict[str, tuple[str, str]] = {
    "numpy": ("numpy", "numpy"),
    "pytorch": ("torch", "torch"),
    "jax": ("jax", "jax"),
}
"""Names accepted by :func:`set_backend`, with the module each one needs and the ``pip`` extra that installs it.

``"torch"`` is accepted as an alias of ``"pytorch"``.

Examples
--------
>>> BACKENDS["pytorch"]
('torch', 'torch')
>>> sorted(BACKENDS)
['jax', 'numpy', 'pytorch']
"""

_ALIASES = {"torch": "pytorch"}

ENV_VAR = "TENSORMOE_BACKEND"


class BackendNotAvailableError(ImportError):
    """Raised when a backend is known but its framework is not installed.

    Examples
    --------
    >>> issubclass(BackendNotAvailableError, ImportError)
    True
    """


_lock = threading.Lock()
# Loading a backend imports its framework and TensorLy's backend for it, and saves
# and restores JAX's x64 flag around that import: one thread at a time, or a second
# thread could save the flag while the first has it switched on, and restore it on.
_load_lock = threading.RLock()
_local = threading.local()
_default: str | None = None  # resolved lazily from the environment
_loaded: set[str] = set()


def canonical_name(name: object, argument: str = "backend") -> str:
    """The backend ``name`` (``"torch"`` included) as one of :data:`BACKENDS`; ``argument`` names it in errors."""
    if not isinstance(name, str):
        raise TypeError(
            f"{argument} must be a string, one of {sorted(BACKENDS)}; "
            f"got {name!r} of type {type(name).__name__}"
        )
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in BACKENDS:
        raise ValueError(
            f"{argument}={name!r} is not a tensormoe backend; expected one of {sorted(BACKENDS)}"
        )
    return key


def load(name: str) -> None:
    """Import the framework of backend ``name`` and TensorLy's backend for it (once, thread-safe)."""
    if name in _loaded:
        return
    with _load_lock:
        if name not in _loaded:
            _import_backend(name)
            _loaded.add(name)


def _import_backend(name: str) -> None:
    module, extra = BACKENDS[name]
    if importlib.util.find_spec(module) is None:
        raise BackendNotAvailableError(
            f"backend {name!r} needs the package {module!r}, which is not installed; "
            f"install it with: pip install 'tensormoe[{extra}]'"
        )
    import tensorly as tl

    if name == "jax":
        import jax

        # TensorLy's JAX backend turns on jax_enable_x64 for the whole process when
        # it is imported.  Keep whatever the user had.
        x64 = bool(jax.config.jax_enable_x64)
        try:
            tl.backend.BackendManager.load_backend("jax")
        finally:
            jax.config.update("jax_enable_x64", x64)
    else:
        tl.backend.BackendManager.load_backend(name)


def _default_backend() -> str:
    global _default
    if _default is None:
        with _lock:
            if _default is None:
                raw = os.environ.get(ENV_VAR, "numpy")
                try:
                    _default = canonical_name(raw, argument=ENV_VAR)
                except (TypeError, ValueError) as err:
                    raise ValueError(str(err)) from None
    return _default


def get_backend() -> str:
    """Return the name of the backend in force in this thread.

    Returns
    -------
    str
        ``"numpy"``, ``"pytorch"`` or ``"jax"``: the innermost
        :func:`backend_context` of this thread, else the process default set by
        :func:`set_backend` or the ``TENSORMOE_BACKEND`` environment variable.

    Examples
    --------
    >>> import tensormoe
    >>> with tensormoe.backend_context("numpy"):
    ...     tensormoe.get_backend()
    'numpy'
    """
    return getattr(_local, "name", None) or _default_backend()


def set_backend(name: str) -> None:
    """Set the process-wide default backend.

    Parameters
    ----------
    name : {"numpy", "pytorch", "jax"}
        The backend (``"torch"`` is accepted for ``"pytorch"``).

    Raises
    ------
    ValueError
        If ``name`` is not a known backend.
    BackendNotAvailableError
        If the framework of that backend is not installed (the message names the
        ``pip`` extra to install).

    Notes
    -----
    Threads that are inside a :func:`backend_context` keep their own backend
    until the context exits.  TensorLy's default backend follows the flag.

    Examples
    --------
    >>> import tensormoe
    >>> previous = tensormoe.get_backend()
    >>> tensormoe.set_backend("numpy")
    >>> tensormoe.get_backend()
    'numpy'
    >>> tensormoe.set_backend(previous)
    """
    global _default
    key = canonical_name(name)
    load(key)
    import tensorly as tl

    with _lock:
        _default = key
        # TensorLy's global default follows ours; its thread-local slot of this
        # thread is left to backend_context.
        manager = tl.backend.BackendManager
        manager._default_backend = key
        manager._backend = manager._loaded_backends[key]
        if getattr(_local, "name", None) is None:
            manager._THREAD_LOCAL_DATA.__dict__.pop("backend", None)


@contextlib.contextmanager
def backend_context(name: str) -> Iterator[str]:
    """Use backend ``name`` in the current thread for the duration of a ``with`` block.

    Other threads and the process default are unaffected, during and after the
    block.  TensorLy's backend for this thread follows, and is restored exactly
    on exit.

    Parameters
    ----------
    name : {"numpy", "pytorch", "jax"}
        The backend to use inside the block.

    Yields
    ------
    str
        The normalised backend name.

    Examples
    --------
    >>> import tensormoe
    >>> with tensormoe.backend_context("numpy") as name:
    ...     name == tensormoe.get_backend()
    True
    """
    key = canonical_name(name)
    load(key)
    import tensorly as tl

    manager = tl.backend.BackendManager
    tl_slot = manager._THREAD_LOCAL_DATA.__dict__
    had_tl, old_tl = "backend" in tl_slot, tl_slot.get("backend")
    old = getattr(_local, "name", None)
    _local.name = key
    tl_slot["backend"] = manager._loaded_backends[key]
    try:
        yield key
    finally:
        _local.name = old
        if had_tl:
            tl_slot["backend"] = old_tl
        else:
            tl_slot.pop("backend", None)


@contextlib.contextmanager
def tensorly_backend(name: str | None = None) -> Iterator[None]:
    """Make TensorLy compute on backend ``name`` (default: tensormoe's current one) in this thread (internal)."""
    with backend_context(name or get_backend()):
        yield


def available_backends() -> list[str]:
    """Return the backends whose framework is installed, without importing any.

    Examples
    --------
    >>> "numpy" in available_backends()
    True
    """
    return [name for name, (module, _) in BACKENDS.items() if importlib.util.find_spec(module)]
