"""tensormoe: multilinear mixture-of-experts layers over factorized weight tensors.

The weights of all experts form one tensor ``W[N_1, ..., N_H, I, O]`` held as a
CP, Tucker, TT or TR factorization and never built; the forward pass is one
contraction planned once by opt_einsum.  The same code runs on NumPy, PyTorch
and JAX, chosen by one flag (:func:`set_backend`, :func:`backend_context`, or the
``TENSORMOE_BACKEND`` environment variable).

Importing tensormoe imports neither PyTorch nor JAX.  The subpackages and
modules not needed by the core (:mod:`tensormoe.torch`, :mod:`tensormoe.jax`, the
old paths such as ``tensormoe.io`` that re-export :mod:`tensormoe.tools.io`) are
imported on first use as attributes: ``tensormoe.io.load(...)`` works after
``import tensormoe``, and only ``tensormoe.torch`` / ``tensormoe.jax`` import
their framework.
"""

import importlib as _importlib

from ._compat import COMPAT_MODULES, install as _install_compat
from ._version import __version__  # noqa: F401 - the package version, one home in _version.py
from .backend import (
    BackendNotAvailableError,
    available_backends,
    backend_context,
    get_backend,
    set_backend,
)
from .layers import CPMMoE, MMoE, TRMMoE, TTMMoE, TuckerMMoE, convert_params
from .layers.accounting import Cost
from .network.contraction import Plan, get_plan
from .network.factorizations import CP, TR, TT, Factorization, Tucker
from .routing import (
    DenseRouter,
    ExpertChoiceRouter,
    Router,
    Routing,
    SoftRouter,
    TopKRouter,
    aux_loss,
    entmax15,
    get_router,
    layer_norm,
    softmax,
    sparsemax,
)
from .tools.compress import Compressed, from_dense, from_linear
from .tools.ranks import Match, match_rank, match_ranks

#: Submodules imported when first used as an attribute (PEP 562), not by ``import tensormoe``.
_LAZY_SUBMODULES = ("frameworks", "jax", "layers", "network", "routing", "tools", "torch")
_install_compat()  # the module paths of earlier versions (tensormoe.layer, ...): see _compat.py


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES or name in COMPAT_MODULES:
        return _importlib.import_module(f"{__name__}.{name}")  # also sets the attribute on the package
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_SUBMODULES, *COMPAT_MODULES})


__all__ = [
    "CP",
    "TR",
    "TT",
    "BackendNotAvailableError",
    "CPMMoE",
    "Compressed",
    "Cost",
    "DenseRouter",
    "ExpertChoiceRouter",
    "Factorization",
    "MMoE",
    "Match",
    "Plan",
    "Router",
    "Routing",
    "SoftRouter",
    "TRMMoE",
    "TTMMoE",
    "TopKRouter",
    "Tucker",
    "TuckerMMoE",
    "aux_loss",
    "available_backends",
    "backend_context",
    "convert_params",
    "entmax15",
    "from_dense",
    "from_linear",
    "get_backend",
    "get_plan",
    "get_router",
    "layer_norm",
    "match_rank",
    "match_ranks",
    "set_backend",
    "softmax",
    "sparsemax",
]
