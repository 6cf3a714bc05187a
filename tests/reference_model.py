"""An independent float64 NumPy model of the reference muMoE implementation (issue 14).

A test helper, not a test file.  It is written from the equations in the issue-14 spec
(``/work/notes/14-spec.md``), not from tensormoe's code and not copied from the
reference: every contraction here is a plain ``np.einsum`` in float64, every gate
normalisation follows the PyTorch layers the reference uses (``BatchNorm1d`` without
affine parameters, ``LayerNorm`` without affine parameters), every activation is
computed from its definition.

Reference layer versions (``version`` below), by file and class:

=====================  ==============================================  ======  ==========
version                file (commits holding that blob)                levels  gate norm
=====================  ==============================================  ======  ==========
``"MMoE.CPMMoE"``      ``MMoE.py`` (ee12f8a, e62681a, 95ada56)          1-4     BatchNorm
``"MMoE.TuckerMMoE"``  ``MMoE.py`` (same)                               1-4     BatchNorm
``"MMoE.TTMMoE"``      ``MMoE.py`` (same; TT when r1 = 1, TR when > 1)  1-4     BatchNorm
``"MuMoE.CPMuMoE"``    ``MuMoE.py`` (3fa814b, 80fd4da), the ``MuMoE``   1-2     bn or ln
                       wrapper with ``MuMoE_layer=CPMuMoE``
``"MuMoE.TRMuMoE"``    same, ``MuMoE_layer=TRMuMoE``                    1-2     bn or ln
=====================  ==============================================  ======  ==========

The two blobs of ``MMoE.py`` differ only in the initialisation of the TT expert cores;
state dicts and forward passes are the same.

Use :func:`reference_state_dict` to make a checkpoint with the reference's exact tensor
names and shapes (every tensor random) and :func:`reference_forward` to evaluate it.

Examples
--------
>>> rng = np.random.default_rng(0)
>>> sd = reference_state_dict("MuMoE.CPMuMoE", input_dim=4, output_dim=8, expert_dims=[32], ranks=16, rng=rng)
>>> sorted(sd)
['MuMoE.factors.0', 'MuMoE.factors.1', 'MuMoE.factors.2', 'bn.0.num_batches_tracked',
 'bn.0.running_mean', 'bn.0.running_var', 'projs.0']
>>> y, stats = reference_forward("MuMoE.CPMuMoE", sd, rng.normal(size=(3, 4)), training=False)
>>> y.shape  # the MuMoE wrapper keeps the token axis of a 2-D input
(3, 1, 8)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "BN_EPS",
    "BN_MOMENTUM",
    "LN_EPS",
    "MAX_HIERARCHY",
    "VERSIONS",
    "batch_norm",
    "entmax15",
    "gelu",
    "reference_config",
    "reference_directional_derivative",
    "reference_forward",
    "reference_shapes",
    "reference_state_dict",
    "softmax",
]

#: Every reference layer version this model covers.
VERSIONS = ("MMoE.CPMMoE", "MMoE.TuckerMMoE", "MMoE.TTMMoE", "MuMoE.CPMuMoE", "MuMoE.TRMuMoE")

#: The most expert levels each version's forward implements (more raise NotImplementedError there).
MAX_HIERARCHY = {"MMoE.CPMMoE": 4, "MMoE.TuckerMMoE": 4, "MMoE.TTMMoE": 4, "MuMoE.CPMuMoE": 2, "MuMoE.TRMuMoE": 2}

#: torch.nn.BatchNorm1d / LayerNorm defaults, which the reference never changes.
BN_EPS = 1e-5
BN_MOMENTUM = 0.1
LN_EPS = 1e-5

_ACTS = ("entmax15", "softmax")


# -- activations and normalisations (from their definitions) ----------------------------------


def softmax(z: np.ndarray) -> np.ndarray:
    """Softmax over the last axis."""
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def entmax15(z: np.ndarray) -> np.ndarray:
    """1.5-entmax over the last axis: ``p = max(z/2 - tau, 0)**2`` with ``tau`` making ``sum(p) = 1``.

    For the ``k`` largest entries ``s_1 >= ... >= s_k`` of ``z/2`` on the support, ``tau``
    solves ``sum_j (s_j - tau)**2 = 1``: ``tau_k = mean_k - sqrt(1/k - var_k)`` (mean and
    biased variance of the ``k`` largest).  The support is the largest ``k`` with
    ``s_k > tau_k``.

    Examples
    --------
    >>> entmax15(np.array([0.0, 0.0]))
    array([0.5, 0.5])
    >>> entmax15(np.array([10.0, 0.0, 0.0]))
    array([1., 0., 0.])
    """
    z = np.asarray(z, dtype=np.float64) / 2.0
    z = z - z.max(axis=-1, keepdims=True)
    s = -np.sort(-z, axis=-1)
    k = np.arange(1, z.shape[-1] + 1, dtype=np.float64)
    mean = np.cumsum(s, axis=-1) / k
    var = np.cumsum(s * s, axis=-1) / k - mean * mean
    tau = mean - np.sqrt(np.clip(1.0 / k - var, 0.0, None))
    on_support = s > tau
    size = z.shape[-1] - np.argmax(on_support[..., ::-1], axis=-1)  # largest k with s_k > tau_k
    t = np.take_along_axis(tau, (size - 1)[..., None], axis=-1)
    return np.clip(z - t, 0.0, None) ** 2


def gelu(x: np.ndarray) -> np.ndarray:
    """``torch.nn.GELU()`` (exact, erf based): ``x * Phi(x)``."""
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _layer_norm(z: np.ndarray, weight: np.ndarray | None = None, bias: np.ndarray | None = None) -> np.ndarray:
    mean = z.mean(axis=-1, keepdims=True)
    var = ((z - mean) ** 2).mean(axis=-1, keepdims=True)  # biased
    out = (z - mean) / np.sqrt(var + LN_EPS)
    if weight is not None:
        out = out * weight + bias
    return out


def _batch_norm(
    z: np.ndarray, stats: Mapping[str, Any], prefix: str, training: bool
) -> tuple[np.ndarray, dict[str, Any]]:
    """BatchNorm1d(N, affine=False) of logits ``z[b, t, n]``: channel ``n``, statistics over ``(b, t)``."""
    mean_key, var_key, count_key = (f"{prefix}.running_mean", f"{prefix}.running_var", f"{prefix}.num_batches_tracked")
    if not training:
        return (z - stats[mean_key]) / np.sqrt(stats[var_key] + BN_EPS), {
            k: stats[k] for k in (mean_key, var_key, count_key)
        }
    count = z.shape[0] * z.shape[1]
    if count <= 1:
        raise ValueError(
            f"BatchNorm in training needs more than 1 value per channel; got batch x tokens = {count}"
        )
    mean = z.mean(axis=(0, 1))
    var = ((z - mean) ** 2).mean(axis=(0, 1))  # biased: used to normalise
    unbiased = var * count / (count - 1)  # used for the running estimate
    new = {
        mean_key: (1.0 - BN_MOMENTUM) * stats[mean_key] + BN_MOMENTUM * mean,
        var_key: (1.0 - BN_MOMENTUM) * stats[var_key] + BN_MOMENTUM * unbiased,
        count_key: np.asarray(stats[count_key]) + 1,
    }
    return (z - mean) / np.sqrt(var + BN_EPS), new


def batch_norm(z: np.ndarray, mean: np.ndarray, var: np.ndarray, count: Any, *, training: bool
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``BatchNorm1d(N, affine=False)`` of ``z[b, t, n]`` (or ``z[b, n]``): output and the buffers after the call."""
    z = np.asarray(z, dtype=np.float64)
    z3 = z[:, None, :] if z.ndim == 2 else z
    stats = {"bn.running_mean": mean, "bn.running_var": var, "bn.num_batches_tracked": count}
    out, new = _batch_norm(z3, stats, "bn", training)
    return out.reshape(z.shape), new["bn.running_mean"], new["bn.running_var"], np.asarray(new["bn.num_batches_tracked"])


def _activate(z: np.ndarray, act: str) -> np.ndarray:
    if act == "entmax15":
        return entmax15(z)
    if act == "softmax":
        return softmax(z)
    raise ValueError(f"act must be one of {list(_ACTS)}; got {act!r}")


# -- configuration: the reference constructors' signatures and defaults -----------------------


def _sig_mmoe_cp(input_dim, output_dim, expert_dims, rank, act="entmax15", use_bias=True, hierarchy=1):
    return dict(locals(), fmt="cp")


def _sig_mmoe_tucker(input_dim, output_dim, expert_dims, ranks, act="entmax15", use_bias=True, hierarchy=1):
    return dict(locals(), fmt="tucker")


def _sig_mmoe_tt(input_dim, output_dim, expert_dims, ranks, act="entmax15", use_bias=1, hierarchy=1):
    return dict(locals(), fmt="tt")


def _sig_mumoe(
    input_dim, output_dim, expert_dims, ranks, second_dim=0, normalization="bn", act="entmax15", use_bias=True,
    hierarchy=1, apply_ln=False,
):
    return dict(locals())


_SIGNATURES = {
    "MMoE.CPMMoE": _sig_mmoe_cp,
    "MMoE.TuckerMMoE": _sig_mmoe_tucker,
    "MMoE.TTMMoE": _sig_mmoe_tt,
    "MuMoE.CPMuMoE": lambda *a, **k: dict(_sig_mumoe(*a, **k), fmt="cp"),
    "MuMoE.TRMuMoE": lambda *a, **k: dict(_sig_mumoe(*a, **k), fmt="tt"),
}


def _check_version(version: str) -> None:
    if version not in _SIGNATURES:
        raise ValueError(f"version must be one of {list(VERSIONS)}; got {version!r}")


def reference_config(version: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """The reference constructor's arguments, bound with its defaults, checked to give a working layer.

    Refuses what the reference accepts at construction but fails on in its forward
    (``hierarchy != len(expert_dims)``, too many levels, Tucker without bias, mismatched
    TT/TR bonds), naming the argument.

    Examples
    --------
    >>> c = reference_config("MMoE.TTMMoE", 4, 8, [32], [[4, None, 4], [4, None, 4], [4, None, 4]])
    >>> c["bonds"], c["dims"]
    ([4, 4, 4, 4], [32, 5, 8])
    """
    _check_version(version)
    cfg = _SIGNATURES[version](*args, **kwargs)
    cfg["version"] = version
    cfg["wrapper"] = version.startswith("MuMoE.")
    experts = list(cfg["expert_dims"])
    h = cfg["hierarchy"]
    if h != len(experts):
        raise ValueError(
            f"hierarchy={h!r} must equal len(expert_dims)={len(experts)} (the reference's forward picks its "
            f"branch by hierarchy and indexes the factors by position)"
        )
    if not 1 <= h <= MAX_HIERARCHY[version]:
        raise ValueError(f"hierarchy={h} is not implemented by {version}: expected 1..{MAX_HIERARCHY[version]}")
    if cfg["act"] not in _ACTS:
        raise ValueError(f"act must be one of {list(_ACTS)}; got {cfg['act']!r}")
    bias = bool(cfg["use_bias"])
    cfg["bias"] = bias
    if cfg["fmt"] == "tucker" and not bias:
        raise ValueError(
            "use_bias=False: the reference TuckerMMoE keeps an input_dim+1 input factor and its forward fails"
        )
    if cfg["wrapper"]:
        if cfg["normalization"] not in ("bn", "ln"):
            raise ValueError(
                f"normalization must be 'bn' or 'ln'; got {cfg['normalization']!r} (the reference's forward "
                "computes no coefficients otherwise)"
            )
        cfg["second_dim"] = int(cfg["second_dim"])
    else:
        cfg.update(normalization="bn", second_dim=0, apply_ln=False)
    rank_arg = cfg.get("rank", cfg.get("ranks"))
    layers = [(cfg["input_dim"], cfg["output_dim"])]
    if cfg["second_dim"] > 0:
        layers.append((cfg["output_dim"], cfg["second_dim"]))
    cfg["layers"] = []
    for i_dim, o_dim in layers:
        dims = experts + [i_dim + int(bias), o_dim]
        layer: dict[str, Any] = {"input_dim": i_dim, "output_dim": o_dim, "dims": dims}
        if cfg["fmt"] == "cp":
            layer["rank"] = int(rank_arg)
        elif cfg["fmt"] == "tucker":
            ranks = list(rank_arg)
            if len(ranks) != len(dims):
                raise ValueError(f"ranks={ranks!r} must have {len(dims)} entries (expert modes, input, output)")
            layer["ranks"] = [int(r) for r in ranks]
        else:
            triples = [list(t) for t in rank_arg]
            if len(triples) != len(dims):
                raise ValueError(f"ranks={rank_arg!r} must list {len(dims)} triples [r_k, n_k, r_k+1]")
            bonds = [int(triples[0][0])]
            for k, t in enumerate(triples):
                if k and int(t[0]) != bonds[-1]:
                    raise ValueError(f"ranks[{k}][0]={t[0]} must equal ranks[{k - 1}][2]={bonds[-1]}")
                bonds.append(int(t[2]))
            if bonds[-1] != bonds[0]:
                raise ValueError(f"ranks[-1][2]={bonds[-1]} must equal ranks[0][0]={bonds[0]} (the ring closes)")
            layer["bonds"] = bonds
        cfg["layers"].append(layer)
    first = cfg["layers"][0]
    cfg["dims"] = first["dims"]
    if "bonds" in first:
        cfg["bonds"] = first["bonds"]
    return cfg


def _factor_shapes(cfg: Mapping[str, Any], layer: Mapping[str, Any]) -> list[tuple[int, ...]]:
    dims = layer["dims"]
    if cfg["fmt"] == "cp":
        return [(d, layer["rank"]) for d in dims]
    if cfg["fmt"] == "tucker":
        return [(d, r) for d, r in zip(dims, layer["ranks"])]
    b = layer["bonds"]
    return [(b[k], d, b[k + 1]) for k, d in enumerate(dims)]


def reference_shapes(version: str, *args: Any, **kwargs: Any) -> dict[str, tuple[int, ...]]:
    """Every state-dict name of the reference module and its shape (``()`` for ``num_batches_tracked``).

    Examples
    --------
    >>> reference_shapes("MMoE.TuckerMMoE", 4, 8, [32], ranks=[8, 8, 8])
    {'core': (8, 8, 8), 'factors.0': (32, 8), 'factors.1': (5, 8), 'factors.2': (8, 8), 'projs.0': (4, 32),
     'bn.0.running_mean': (32,), 'bn.0.running_var': (32,), 'bn.0.num_batches_tracked': ()}
    """
    cfg = reference_config(version, *args, **kwargs)
    shapes: dict[str, tuple[int, ...]] = {}
    experts = list(cfg["expert_dims"])
    if cfg["wrapper"]:
        for prefix, layer in zip(("MuMoE", "MuMoE2"), cfg["layers"]):
            for k, s in enumerate(_factor_shapes(cfg, layer)):
                shapes[f"{prefix}.factors.{k}"] = s
        for h, n in enumerate(experts):
            shapes[f"projs.{h}"] = (cfg["input_dim"], n)
        if cfg["apply_ln"]:
            shapes["input_ln.weight"] = (cfg["input_dim"],)
            shapes["input_ln.bias"] = (cfg["input_dim"],)
    else:
        layer = cfg["layers"][0]
        if cfg["fmt"] == "tucker":
            shapes["core"] = tuple(layer["ranks"])
        for k, s in enumerate(_factor_shapes(cfg, layer)):
            shapes[f"factors.{k}"] = s
        for h, n in enumerate(experts):
            shapes[f"projs.{h}"] = (cfg["input_dim"], n)
    if cfg["normalization"] == "bn":
        for h, n in enumerate(experts):
            shapes[f"bn.{h}.running_mean"] = (n,)
            shapes[f"bn.{h}.running_var"] = (n,)
            shapes[f"bn.{h}.num_batches_tracked"] = ()
    return shapes


def reference_state_dict(version: str, *args: Any, rng: np.random.Generator, **kwargs: Any) -> dict[str, np.ndarray]:
    """A state dict with the reference's exact names and shapes, every tensor random (float64).

    ``args``/``kwargs`` are the reference constructor's (``act`` is accepted and ignored:
    it holds no tensor).  Factors and cores are ``N(0, 1/sqrt(fan))``-ish so outputs stay
    ``O(1)``; gates ``N(0, 1)``; BatchNorm running means ``N(0, 1)``, running variances
    ``U(0.5, 2)``, ``num_batches_tracked`` a random int64 scalar; ``input_ln`` weight and
    bias random.

    Examples
    --------
    >>> sd = reference_state_dict("MMoE.CPMMoE", 4, 8, [32, 2], rank=8, hierarchy=2, rng=np.random.default_rng(0))
    >>> {k: v.shape for k, v in sd.items() if k.startswith("factors")}
    {'factors.0': (32, 8), 'factors.1': (2, 8), 'factors.2': (5, 8), 'factors.3': (8, 8)}
    """
    shapes = reference_shapes(version, *args, **kwargs)
    out: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            out[name] = np.asarray(rng.integers(0, 1000), dtype=np.int64)
        elif name.endswith("running_var"):
            out[name] = rng.uniform(0.5, 2.0, size=shape)
        elif name.endswith("running_mean") or name.startswith("projs") or name == "input_ln.bias":
            out[name] = rng.normal(size=shape)
        elif name == "input_ln.weight":
            out[name] = rng.normal(1.0, 0.5, size=shape)
        else:  # factors and core: scale so each contracted sum stays O(1)
            fan = shape[0] if len(shape) == 2 else int(np.prod(shape)) ** (1.0 / len(shape))
            out[name] = rng.normal(size=shape) / math.sqrt(max(fan, 1))
    return out


# -- the forward ------------------------------------------------------------------------------


def _experts(cfg: Mapping[str, Any], factors: list[np.ndarray], core: np.ndarray | None,
             coeffs: list[np.ndarray], z: np.ndarray) -> np.ndarray:
    """``y[b,t,o] = sum_{n_1..n_H, i} W[n_1..n_H, i, o] a_1[b,t,n_1] ... a_H[b,t,n_H] z[b,t,i]``, factorized."""
    h = len(coeffs)
    if cfg["bias"]:
        z = np.concatenate([z, np.ones(z.shape[:-1] + (1,))], axis=-1)
    if cfg["fmt"] == "cp":
        # y = sum_r prod_h (a_h U_h)[.., r] * (z U_I)[.., r] * U_O[o, r]
        prod = np.einsum("bti,ir->btr", z, factors[h])
        for a, u in zip(coeffs, factors[:h]):
            prod = prod * np.einsum("btn,nr->btr", a, u)
        return np.einsum("btr,or->bto", prod, factors[h + 1])
    if cfg["fmt"] == "tucker":
        # y = G[p_1..p_H, q, s] prod_h (a_h U_h)[.., p_h] (z U_I)[.., q] U_O[o, s]
        letters = "cdefgh"[: h + 2]
        operands, terms = [core], [letters]
        for a, u, p in zip(coeffs, factors[:h], letters):
            operands.append(a @ u)
            terms.append("bt" + p)
        operands += [z @ factors[h], factors[h + 1]]
        terms += ["bt" + letters[h], "o" + letters[h + 1]]
        return np.einsum(",".join(terms) + "->bto", *operands, optimize=True)
    # TT / TR: y = trace over the ring of M_1 ... M_H M_I G_O[:, o, :], M_k = sum_n a[n] G_k[:, n, :]
    chain = None
    for vec, g in zip(list(coeffs) + [z], factors[: h + 1]):
        m = np.einsum("btn,pnq->btpq", vec, g)
        chain = m if chain is None else chain @ m
    return np.einsum("btpq,qop->bto", chain, factors[h + 1])


def _split(state_dict: Mapping[str, Any], prefix: str) -> tuple[list[np.ndarray], np.ndarray | None]:
    factors = []
    k = 0
    while f"{prefix}factors.{k}" in state_dict:
        factors.append(np.asarray(state_dict[f"{prefix}factors.{k}"], dtype=np.float64))
        k += 1
    core = state_dict.get(f"{prefix}core")
    return factors, None if core is None else np.asarray(core, dtype=np.float64)


def _infer_config(version: str, state_dict: Mapping[str, Any], act: str) -> dict[str, Any]:
    """Rebuild the constructor arguments from the names and shapes of a state dict."""
    _check_version(version)
    wrapper = version.startswith("MuMoE.")
    pre = "MuMoE." if wrapper else ""
    projs = []
    while f"projs.{len(projs)}" in state_dict:
        projs.append(np.shape(state_dict[f"projs.{len(projs)}"]))
    if not projs:
        raise KeyError("state_dict has no 'projs.0' (the first level's gate)")
    experts = [s[1] for s in projs]
    input_dim = projs[0][0]
    factors, core = _split(state_dict, pre)
    h = len(experts)
    if len(factors) != h + 2:
        raise ValueError(f"state_dict has {len(factors)} '{pre}factors.k' tensors; expected {h + 2} for {h} levels")
    fmt = {"CPMMoE": "cp", "CPMuMoE": "cp", "TuckerMMoE": "tucker"}.get(version.split(".")[1], "tt")
    in_size = factors[h].shape[0] if fmt in ("cp", "tucker") else factors[h].shape[1]
    if in_size not in (input_dim, input_dim + 1):
        raise ValueError(f"{pre}factors.{h} has input size {in_size}; expected {input_dim} or {input_dim + 1}")
    output_dim = factors[h + 1].shape[0] if fmt in ("cp", "tucker") else factors[h + 1].shape[1]
    kwargs: dict[str, Any] = {"input_dim": input_dim, "output_dim": output_dim, "expert_dims": experts, "act": act,
                                  "use_bias": in_size == input_dim + 1, "hierarchy": h}
    if fmt == "cp":
        kwargs["ranks" if wrapper else "rank"] = factors[0].shape[1]
    elif fmt == "tucker":
        if core is None:
            raise KeyError("state_dict is missing 'core' (the Tucker core)")
        kwargs["ranks"] = list(core.shape)
    else:
        kwargs["ranks"] = [[f.shape[0], None, f.shape[2]] for f in factors]
    if wrapper:
        second, _ = _split(state_dict, "MuMoE2.")
        if second:
            kwargs["second_dim"] = second[-1].shape[0] if fmt == "cp" else second[-1].shape[1]
        kwargs["normalization"] = "bn" if "bn.0.running_mean" in state_dict else "ln"
        kwargs["apply_ln"] = "input_ln.weight" in state_dict
    cfg = reference_config(version, **kwargs)
    expected = reference_shapes(version, **kwargs)
    for name, shape in expected.items():
        if name not in state_dict:
            raise KeyError(f"state_dict is missing {name!r} (shape {shape})")
        if tuple(np.shape(state_dict[name])) != shape:
            raise ValueError(f"state_dict[{name!r}] has shape {tuple(np.shape(state_dict[name]))}; expected {shape}")
    unknown = sorted(set(state_dict) - set(expected))
    if unknown:
        raise KeyError(f"state_dict has names the reference {version} does not: {unknown}")
    return cfg


def reference_forward(
    version: str,
    state_dict: Mapping[str, Any],
    x: Any,
    *,
    training: bool,
    running_stats: Mapping[str, Any] | None = None,
    act: str = "entmax15",
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The reference module's output on ``x`` and its BatchNorm statistics after the call.

    Parameters
    ----------
    version : str
        One of :data:`VERSIONS`.
    state_dict : mapping of str to array
        Names and shapes as the reference's ``state_dict()`` (checked: a missing, extra or
        misshapen tensor raises, naming it).  The configuration is read from the shapes.
    x : array
        ``[B, I]`` or ``[B, T, I]``.
    training : bool
        ``module.train()`` (BatchNorm uses and updates batch statistics) or ``module.eval()``.
    running_stats : mapping, optional
        ``bn.{h}.running_mean`` / ``running_var`` / ``num_batches_tracked`` to use instead of
        those in ``state_dict``.
    act : {"entmax15", "softmax"}
        The gate activation (a callable in the reference, not in its state dict).

    Returns
    -------
    y : ndarray
        ``MMoE.*``: ``[B, T, O]`` squeezed on axis 1 (so ``[B, O]`` when ``T == 1``);
        ``MuMoE.*``: ``[B, T, O]`` (``[B, 1, O]`` for a 2-D input), ``O`` = ``second_dim``
        for a two-layer block.
    stats : dict
        The BatchNorm buffers after the call (updated in training, unchanged in eval;
        empty for ``normalization="ln"``).
    """
    cfg = _infer_config(version, state_dict, act)
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2:
        x = x[:, None, :]
    if x.ndim != 3 or x.shape[-1] != cfg["input_dim"]:
        raise ValueError(f"x must be [B, {cfg['input_dim']}] or [B, T, {cfg['input_dim']}]; got shape {x.shape}")
    stats_in = {k: v for k, v in state_dict.items() if k.startswith("bn.")}
    if running_stats is not None:
        stats_in.update(running_stats)
    stats_in = {k: np.asarray(v, dtype=np.int64 if k.endswith("tracked") else np.float64) for k, v in stats_in.items()}
    # gates read the raw input: a_h = act(Norm_h(x @ P_h))
    coeffs, stats_out = [], {}
    for h in range(cfg["hierarchy"]):
        logits = x @ np.asarray(state_dict[f"projs.{h}"], dtype=np.float64)
        if cfg["normalization"] == "bn":
            logits, new = _batch_norm(logits, stats_in, f"bn.{h}", training)
            stats_out.update(new)
        else:
            logits = _layer_norm(logits)
        coeffs.append(_activate(logits, cfg["act"]))
    if not cfg["wrapper"]:
        factors, core = _split(state_dict, "")
        y = _experts(cfg, factors, core, coeffs, x)
        return (y[:, 0] if y.shape[1] == 1 else y), stats_out
    z = x
    if cfg["apply_ln"]:  # only the experts see LN(x)
        z = _layer_norm(x, np.asarray(state_dict["input_ln.weight"], dtype=np.float64),
                        np.asarray(state_dict["input_ln.bias"], dtype=np.float64))
    factors, _ = _split(state_dict, "MuMoE.")
    y = _experts(cfg, factors, None, coeffs, z)
    if cfg["second_dim"] > 0:
        factors2, _ = _split(state_dict, "MuMoE2.")
        y = _experts(cfg, factors2, None, coeffs, gelu(y))
    return y, stats_out


def reference_directional_derivative(
    version: str,
    state_dict: Mapping[str, Any],
    x: Any,
    *,
    cotangent: Any,
    direction: Mapping[str, Any],
    training: bool,
    running_stats: Mapping[str, Any] | None = None,
    act: str = "entmax15",
    step: float = 1e-4,
) -> tuple[float, float]:
    """``d/de sum(cotangent * y(params + e * v, x + e * v_x))`` at ``e = 0``, by central differences.

    The float64 gradient reference: for any gradient ``g`` of the same scalar,
    ``sum_k <g_k, v_k>`` must equal this.  ``direction`` maps state-dict names (and
    ``"x"``) to arrays of their shapes; names left out are held fixed (BatchNorm buffers
    are not parameters and are never moved).  Fourth-order differences at steps
    ``step * 2**-k``, ``k = 0..3`` (truncation ``O(h**4)``, rounding ``~1e-16 * |f| / h``); the
    estimate agreeing best with the one at twice its step is returned.

    Returns
    -------
    derivative : float
    error : float
        ``|D(h) - D(2h)|`` for the returned ``h``: an estimate of its error; a large value
        means a kink of the activation (a support change of 1.5-entmax) lies within ``4h``
        even at the smallest step.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> sd = reference_state_dict("MMoE.CPMMoE", 3, 2, [4], 2, rng=rng)
    >>> x, ct = rng.normal(size=(5, 3)), rng.normal(size=(5, 2))
    >>> d, err = reference_directional_derivative("MMoE.CPMMoE", sd, x, cotangent=ct, direction={"x": np.ones((5, 3))},
    ...                                           training=False)
    >>> err < 1e-9
    True
    """
    for name in direction:
        if name != "x" and name not in state_dict:
            raise KeyError(f"direction names {name!r}, which state_dict does not have")
        if name.startswith("bn."):
            raise ValueError(f"direction names the BatchNorm buffer {name!r}; buffers are not parameters")
    x = np.asarray(x, dtype=np.float64)
    cotangent = np.asarray(cotangent, dtype=np.float64)

    def f(e: float) -> float:
        moved = {k: (np.asarray(v, dtype=np.float64) + e * np.asarray(direction[k], dtype=np.float64)
                     if k in direction else v) for k, v in state_dict.items()}
        xe = x + e * np.asarray(direction["x"], dtype=np.float64) if "x" in direction else x
        y, _ = reference_forward(version, moved, xe, training=training, running_stats=running_stats, act=act)
        return float(np.sum(cotangent * y))

    def d(h: float) -> float:
        return (-f(2 * h) + 8 * f(h) - 8 * f(-h) + f(-2 * h)) / (12 * h)

    # halve the step while that helps: keep the pair of successive estimates that agree best
    estimates = [d(step * 2.0**-k) for k in range(4)]
    errors = [abs(a - b) for a, b in zip(estimates[1:], estimates[:-1])]
    best = int(np.argmin(errors))
    return estimates[best + 1], errors[best]
