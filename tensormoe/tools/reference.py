"""Checkpoints of the reference muMoE implementation: what each tensor is in tensormoe.

The paper's reference implementation (james-oldfield/muMoE) has had two files of
layers, whose ``state_dict()`` names differ:

=====================================  ===================================================
reference module                       state dict
=====================================  ===================================================
``MMoE.py``: ``CPMMoE``,               ``factors.k``, ``core`` (Tucker), ``projs.h``,
``TuckerMMoE``, ``TTMMoE`` (1-4        ``bn.h.running_mean``, ``bn.h.running_var``,
levels; a ring when ``r_0 > 1``)       ``bn.h.num_batches_tracked``
``MuMoE.py``: ``MuMoE`` wrapping       ``MuMoE.factors.k``, ``MuMoE2.factors.k`` (with
``CPMuMoE`` or ``TRMuMoE`` (1-2        ``second_dim``), ``projs.h``, ``input_ln.weight``
levels)                                and ``input_ln.bias`` (with ``apply_ln``), ``bn.h.*``
                                       (``normalization="bn"``; none with ``"ln"``)
=====================================  ===================================================

:func:`read_state_dict` maps every tensor, by name and shape, to its place in
tensormoe (:class:`ReferenceCheckpoint`); nothing is copied and nothing is
dropped: a name it does not know, a missing tensor or a shape that does not fit
the others is refused, naming the tensor.  The layers' configuration is read from
the shapes alone; only the gate activation (a function in the reference, not in
its state dict) is an argument.  No tensor is reshaped or transposed: the
reference's mode order ``[N_1, ..., N_H, I(+1), O]`` and layouts are tensormoe's.

How the reference computes, and so what the loaded layers must compute:

* gates ``a_h = act(Norm_h(x @ P_h))`` on the raw input, ``P_h = projs.h``
  ``[I, N_h]``; ``Norm_h`` a ``BatchNorm1d`` without affine parameters
  (:mod:`tensormoe.routing.batchnorm`; ``gate_norm="batchnorm"``) or, for
  ``MuMoE`` with ``normalization="ln"``, a LayerNorm without them
  (``gate_norm="layernorm"``);
* with bias, a one appended to the input (the input mode has ``I + 1`` entries);
* the ``MuMoE`` wrapper with ``apply_ln`` feeds ``LayerNorm(x)`` (with its weight
  and bias) to the experts only, the gates still read ``x``; with ``second_dim``
  a second layer ``y = L2(GELU(L1(x; a)); a)`` reuses the first layer's
  coefficients and has no gates of its own;
* outputs: ``MMoE.py`` squeezes axis 1 (``[B, O]`` for ``[B, I]`` and for
  ``[B, 1, I]``); ``MuMoE`` keeps it (``[B, 1, O]`` for ``[B, I]``); tensormoe
  returns ``[..., O]`` for ``[..., I]``.

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> state = {"factors.0": rng.normal(size=(32, 4)), "factors.1": rng.normal(size=(5, 4)),
...          "factors.2": rng.normal(size=(8, 4)), "projs.0": np.zeros((4, 32)),
...          "bn.0.running_mean": np.zeros(32), "bn.0.running_var": np.ones(32),
...          "bn.0.num_batches_tracked": np.array(3)}
>>> checkpoint = read_state_dict(state)
>>> checkpoint.source
'MMoE.CPMMoE'
>>> checkpoint.configs[0]
{'class': 'CPMMoE', 'in_dim': 4, 'out_dim': 8, 'expert_dims': [32], 'rank': 4, 'bias': True, 'gate': 'entmax15', 'gate_norm': 'batchnorm'}
>>> checkpoint.names["projs.0"], checkpoint.names["bn.0.running_var"]
('layers[0].gate_0', 'gate_norm_state[0].var')
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from .._array import dtype_name, to_numpy
from ..backend import get_backend
from ..frameworks import get_ops
from ..layers import MMoE, layer_from_config
from ..routing.batchnorm import EPS, BatchNormState
from ..routing.gates import ACTIVATIONS
from ..validation import check_bool, check_choice, check_dtype, describe

__all__ = ["SOURCES", "ReferenceCheckpoint", "ReferenceModel", "from_reference", "read_state_dict"]

SOURCES = ("MMoE.CPMMoE", "MMoE.TuckerMMoE", "MMoE.TTMMoE", "MuMoE.CPMuMoE", "MuMoE.TRMuMoE")
"""The reference layer versions a checkpoint can come from (``file.class``).

Examples
--------
>>> len(SOURCES)
5
"""

_BN_FIELDS = {"running_mean": "mean", "running_var": "var", "num_batches_tracked": "count"}
_PATTERNS = {
    "MMoE": re.compile(r"(factors)\.(\d+)|(core)|(projs)\.(\d+)|(bn)\.(\d+)\.(running_mean|running_var|num_batches_tracked)"),
    "MuMoE": re.compile(
        r"(MuMoE2?)\.factors\.(\d+)|(projs)\.(\d+)|(input_ln)\.(weight|bias)"
        r"|(bn)\.(\d+)\.(running_mean|running_var|num_batches_tracked)"
    ),
}


@dataclasses.dataclass(frozen=True)
class ReferenceCheckpoint:
    """A reference state dict, each tensor at its place in tensormoe (the arrays as given, not copied).

    Attributes
    ----------
    source : str
        The reference layer version, one of :data:`SOURCES`.
    configs : tuple of dict
        One tensormoe layer configuration per layer (two for a ``MuMoE`` with
        ``second_dim``): ``"class"`` and the constructor arguments, as
        a layer's ``config()`` writes them.
    params : tuple of dict
        Per layer, tensormoe parameter name -> the checkpoint's array
        (``factor_k``, ``core``, ``gate_h``).  The second layer has no gates in the
        reference: its ``params`` hold only its factors.
    gate_norm_state : tuple of BatchNormState or None
        The running statistics of each level's BatchNorm (``None`` for LayerNorm gates).
    input_ln : tuple of (weight, bias) or None
        The ``apply_ln`` LayerNorm of the experts' input (``None`` without ``apply_ln``).
    squeeze_tokens : bool
        ``True`` for ``MMoE.py`` (its output drops a token axis of size 1), ``False``
        for ``MuMoE`` (which returns ``[B, 1, O]`` for a ``[B, I]`` input).
    names : dict
        Every name of the state dict -> where it went (``"layers[0].factor_2"``,
        ``"gate_norm_state[1].mean"``, ``"input_ln.weight"``): nothing is dropped.
    dtype : str
        The floating-point dtype of the factors.

    Examples
    --------
    >>> import numpy as np
    >>> f = [np.ones((1, 6, 2)), np.ones((2, 5, 3)), np.ones((3, 7, 1))]
    >>> c = read_state_dict({**{f"MuMoE.factors.{k}": v for k, v in enumerate(f)}, "projs.0": np.ones((4, 6))})
    >>> c.source, c.configs[0]["class"], c.configs[0]["ranks"], c.configs[0]["gate_norm"]
    ('MuMoE.TRMuMoE', 'TTMMoE', [1, 2, 3, 1], 'layernorm')
    """

    source: str
    configs: tuple[dict[str, Any], ...]
    params: tuple[dict[str, Any], ...]
    gate_norm_state: tuple[BatchNormState, ...] | None
    input_ln: tuple[Any, Any] | None
    squeeze_tokens: bool
    names: dict[str, str]
    dtype: str


def _shape(name: str, value: Any) -> tuple[int, ...]:
    shape = getattr(value, "shape", None)
    if shape is None:
        raise TypeError(f"state_dict[{name!r}] must be an array (NumPy, PyTorch or JAX); got {describe(value)}")
    return tuple(int(s) for s in shape)


def _indexed(found: Mapping[int, Any], what: str, count: int | None = None) -> list[Any]:
    """``found[0..n-1]`` as a list, refusing gaps and extra indices by name."""
    n = len(found) if count is None else count
    missing = [f"{what}.{k}" for k in range(n) if k not in found]
    extra = [f"{what}.{k}" for k in sorted(found) if k >= n]
    if missing or extra:
        raise ValueError(
            "state_dict " + " and ".join(
                p for p in (missing and f"is missing {missing}", extra and f"has the unexpected {extra}") if p
            ) + f"; expected {what}.0 to {what}.{n - 1}"
        )
    return [found[k] for k in range(n)]


def _expect(name: str, shape: tuple[int, ...], expected: tuple[int, ...], why: str) -> None:
    if shape != expected:
        raise ValueError(f"state_dict[{name!r}] has shape {shape}; expected {expected} ({why})")


def _layer(prefix: str, factors: list[tuple[str, Any]], core: tuple[str, Any] | None, experts: list[int],
           in_dim: int, bias: bool | None, fmt: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, str], bool]:
    """The config and params of one layer from its factors (shapes checked against each other)."""
    h = len(experts)
    shapes = [_shape(n, v) for n, v in factors]
    names = [n for n, _ in factors]
    if len(factors) != h + 2:
        raise ValueError(
            f"state_dict has {len(factors)} {prefix}factors.k tensors; expected {h + 2} ({h} expert level(s) from "
            f"projs.*, then the input and output factors)"
        )
    in_axis = 0 if fmt != "chain" else 1
    in_size = shapes[h][in_axis] if len(shapes[h]) > in_axis else None
    if bias is None:
        if in_size not in (in_dim, in_dim + 1):
            raise ValueError(
                f"state_dict[{names[h]!r}] has shape {shapes[h]}: its input mode has {in_size} entries; expected "
                f"in_dim={in_dim} (projs.0 is [{in_dim}, N]) or in_dim + 1 = {in_dim + 1} with the bias row"
            )
        bias = in_size == in_dim + 1
    dims = [*experts, in_dim + int(bias)]
    out_dim = shapes[h + 1][in_axis] if len(shapes[h + 1]) > in_axis else 0
    dims.append(out_dim)
    config: dict[str, Any]
    if fmt == "cp":
        rank = shapes[0][1] if len(shapes[0]) == 2 else 0
        for k, (name, shape) in enumerate(zip(names, shapes)):
            _expect(name, shape, (dims[k], rank), f"CP factor {k}: [mode size, rank {rank}]")
        config = {"class": "CPMMoE", "rank": rank}
    elif fmt == "tucker":
        ranks = [s[1] if len(s) == 2 else 0 for s in shapes]
        for k, (name, shape) in enumerate(zip(names, shapes)):
            _expect(name, shape, (dims[k], ranks[k]), f"Tucker factor {k}: [mode size, rank]")
        if not bias:
            raise ValueError(
                f"state_dict[{names[h]!r}] has shape {shapes[h]}: a Tucker input factor without the bias row; "
                f"expected {in_dim + 1} rows (the reference's TuckerMMoE always has them)"
            )
        _expect(core[0], _shape(*core), tuple(ranks), "the Tucker core: one axis per factor's rank")
        config = {"class": "TuckerMMoE", "ranks": ranks}
    else:
        bonds = [shapes[0][0] if len(shapes[0]) == 3 else 0]
        for k, (name, shape) in enumerate(zip(names, shapes)):
            right = shape[2] if len(shape) == 3 else 0
            right = bonds[0] if k == h + 1 else right
            shared = f", r_{k} = {bonds[-1]} from {names[k - 1]}" if k else ""
            _expect(name, shape, (bonds[-1], dims[k], right), f"core {k}: [r_{k}, mode size, r_{k + 1}]{shared}")
            bonds.append(right)
        config = {"class": "TTMMoE" if bonds[0] == 1 else "TRMMoE", "ranks": bonds}
    params = {f"factor_{k}": v for k, (_, v) in enumerate(factors)}
    placed = {name: f"factor_{k}" for k, name in enumerate(names)}
    if core is not None:
        params["core"] = core[1]
        placed[core[0]] = "core"
    head = {"class": config.pop("class"), "in_dim": in_dim, "out_dim": out_dim, "expert_dims": list(experts)}
    return {**head, **config, "bias": bias}, params, placed, bias


def read_state_dict(state_dict: Mapping[str, Any], *, gate: str = "entmax15", prefix: str = "") -> ReferenceCheckpoint:
    """Map a reference checkpoint's tensors to tensormoe layers, by name and shape.

    Parameters
    ----------
    state_dict : mapping of str to array
        A reference module's ``state_dict()`` (PyTorch tensors, or NumPy/JAX arrays
        of the same shapes).
    gate : {"entmax15", "softmax", "sparsemax"}
        The gate activation the reference module was built with (its ``act``;
        default 1.5-entmax, the reference's default).  Not in the state dict.
    prefix : str
        Read only the names that start with ``prefix`` (stripped), e.g.
        ``"transformer.h.0.mlp.MuMoE_layer."`` for one layer of a whole model's
        state dict; the other names belong to other modules and are not read.

    Returns
    -------
    ReferenceCheckpoint

    Raises
    ------
    ValueError
        If a name is not one of the reference's, a tensor is missing, or a shape
        does not fit the others; the message names the tensor.
    TypeError
        If ``state_dict`` is not a mapping of names to arrays.

    Examples
    --------
    A two-layer ``MuMoE`` block with ``apply_ln`` and LayerNorm gates (the GPT-2 MLP):

    >>> import numpy as np
    >>> z = np.zeros
    >>> state = {"MuMoE.factors.0": z((8, 3)), "MuMoE.factors.1": z((5, 3)), "MuMoE.factors.2": z((16, 3)),
    ...          "MuMoE2.factors.0": z((8, 3)), "MuMoE2.factors.1": z((17, 3)), "MuMoE2.factors.2": z((4, 3)),
    ...          "projs.0": z((4, 8)), "input_ln.weight": z(4), "input_ln.bias": z(4)}
    >>> c = read_state_dict(state)
    >>> [(k["in_dim"], k["out_dim"]) for k in c.configs], sorted(c.params[1]), c.input_ln is not None
    ([(4, 16), (16, 4)], ['factor_0', 'factor_1', 'factor_2'], True)

    Anything the reference would not have written is refused by name:

    >>> read_state_dict({**state, "MuMoE.scale": z(1)})
    Traceback (most recent call last):
    ...
    ValueError: state_dict has names a reference MuMoE checkpoint does not: ['MuMoE.scale']; expected MuMoE.factors.k, MuMoE2.factors.k, projs.h, input_ln.weight/bias, bn.h.running_mean/running_var/num_batches_tracked
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of tensor names to arrays; got {describe(state_dict)}")
    gate = check_choice(gate, "gate", sorted(ACTIVATIONS), what="a gate activation")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a string; got {describe(prefix)}")
    bad = [k for k in state_dict if not isinstance(k, str)]
    if bad:
        raise TypeError(f"state_dict names must be strings; got {bad[:3]!r}")
    entries = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not entries:
        raise ValueError(f"state_dict has no name starting with prefix={prefix!r}; expected a reference layer's tensors")
    family = "MuMoE" if any(k.startswith(("MuMoE.", "MuMoE2.")) for k in entries) else "MMoE"
    pattern = _PATTERNS[family]
    unknown = sorted(prefix + k for k in entries if not pattern.fullmatch(k))
    if unknown:
        expected = ("factors.k, core (Tucker), projs.h, bn.h.running_mean/running_var/num_batches_tracked"
                    if family == "MMoE" else "MuMoE.factors.k, MuMoE2.factors.k, projs.h, input_ln.weight/bias, "
                    "bn.h.running_mean/running_var/num_batches_tracked")
        raise ValueError(f"state_dict has names a reference {family} checkpoint does not: {unknown}; expected {expected}")

    factors: dict[str, dict[int, tuple[str, Any]]] = {"": {}, "MuMoE.": {}, "MuMoE2.": {}}
    projs: dict[int, tuple[str, Any]] = {}
    norms: dict[int, dict[str, tuple[str, Any]]] = {}
    ln: dict[str, tuple[str, Any]] = {}
    core = None
    for key, value in entries.items():
        name = prefix + key
        _shape(name, value)
        if key.startswith(("factors.", "MuMoE.", "MuMoE2.")):
            layer, _, k = key.rpartition(".")
            factors[layer.removesuffix("factors")][int(k)] = (name, value)
        elif key == "core":
            core = (name, value)
        elif key.startswith("projs."):
            projs[int(key.split(".")[1])] = (name, value)
        elif key.startswith("bn."):
            _, h, field = key.split(".")
            norms.setdefault(int(h), {})[field] = (name, value)
        else:
            ln[key.split(".")[1]] = (name, value)

    # the levels and the input size come from the gates
    gates = _indexed(projs, prefix + "projs")
    gate_shapes = [_shape(n, v) for n, v in gates]
    in_dim = gate_shapes[0][0] if len(gate_shapes[0]) == 2 else 0
    experts = []
    for (name, _), shape in zip(gates, gate_shapes):
        if len(shape) != 2 or shape[0] != in_dim or shape[1] < 1:
            raise ValueError(f"state_dict[{name!r}] has shape {shape}; expected [{in_dim}, N_h] (a gate of the input)")
        experts.append(shape[1])

    first = "MuMoE." if family == "MuMoE" else ""
    layer_factors = _indexed(factors[first], prefix + first + "factors")
    ndims = {len(_shape(n, v)) for n, v in layer_factors}
    if ndims not in ({2}, {3}):
        raise ValueError(
            f"state_dict's {prefix + first}factors.k have {sorted(ndims)} axes; expected all 2 (CP, Tucker) or all 3 "
            f"(TT/TR cores)"
        )
    fmt = "chain" if ndims == {3} else "tucker" if core is not None else "cp"
    if core is not None and fmt != "tucker":
        raise ValueError(f"state_dict[{core[0]!r}] is a Tucker core, but the factors are TT/TR cores (3 axes)")
    config, params, placed, bias = _layer(first, layer_factors, core, experts, in_dim, None, fmt)
    configs, all_params = [config], [params]
    names = {name: f"layers[0].{p}" for name, p in placed.items()}
    for h, (name, value) in enumerate(gates):
        params[f"gate_{h}"] = value
        names[name] = f"layers[0].gate_{h}"
    if factors["MuMoE2."]:
        second = _indexed(factors["MuMoE2."], prefix + "MuMoE2.factors")
        config2, params2, placed2, _ = _layer("MuMoE2.", second, None, experts, config["out_dim"], bias, fmt)
        key = "rank" if fmt == "cp" else "ranks"
        if config2[key] != config[key]:
            raise ValueError(
                f"state_dict's {prefix}MuMoE2.factors.k have {key}={config2[key]}; expected the first layer's "
                f"{key}={config[key]} (the reference builds both layers from one ranks argument)"
            )
        configs.append(config2)
        all_params.append(params2)
        names.update({name: f"layers[1].{p}" for name, p in placed2.items()})

    state = None
    if norms or family == "MMoE":
        levels = _indexed(norms, prefix + "bn", len(experts))
        state_levels = []
        for h, fields in enumerate(levels):
            missing = [f"{prefix}bn.{h}.{f}" for f in _BN_FIELDS if f not in fields]
            if missing:
                raise ValueError(f"state_dict is missing {missing}; expected every BatchNorm buffer of level {h}")
            for field, target in _BN_FIELDS.items():
                name, value = fields[field]
                _expect(name, _shape(name, value), () if target == "count" else (experts[h],),
                        f"level {h}'s BatchNorm over its {experts[h]} experts")
                names[name] = f"gate_norm_state[{h}].{target}"
            state_levels.append(BatchNormState(*(fields[f][1] for f in _BN_FIELDS)))
        state = tuple(state_levels)
    input_ln = None
    if ln:
        missing = [f"{prefix}input_ln.{f}" for f in ("weight", "bias") if f not in ln]
        if missing:
            raise ValueError(f"state_dict is missing {missing}; expected both input_ln tensors (apply_ln)")
        for field, (name, value) in ln.items():
            _expect(name, _shape(name, value), (in_dim,), "the apply_ln LayerNorm of the input")
            names[name] = f"input_ln.{field}"
        input_ln = (ln["weight"][1], ln["bias"][1])
    for c in configs:
        c.update(gate=gate, gate_norm="layernorm" if state is None else "batchnorm")
    source = {("MMoE", "cp"): "MMoE.CPMMoE", ("MMoE", "tucker"): "MMoE.TuckerMMoE", ("MMoE", "chain"): "MMoE.TTMMoE",
              ("MuMoE", "cp"): "MuMoE.CPMuMoE", ("MuMoE", "chain"): "MuMoE.TRMuMoE"}[(family, fmt)]
    assert set(names) == {prefix + k for k in entries}, "every tensor has a place"  # noqa: S101
    return ReferenceCheckpoint(
        source=source,
        configs=tuple(configs),
        params=tuple(all_params),
        gate_norm_state=state,
        input_ln=input_ln,
        squeeze_tokens=family == "MMoE",
        names=names,
        dtype=dtype_name(layer_factors[0][1]),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class ReferenceModel:
    """A reference muMoE module as tensormoe layers: the same function, on NumPy, PyTorch or JAX.

    Built by :func:`from_reference`.  Its :meth:`apply` is a pure function of
    ``(params, x, state)``: differentiate it with PyTorch's autograd or
    ``jax.grad``, compile it with ``jax.jit``.

    Attributes
    ----------
    source : str
        The reference layer version (one of :data:`SOURCES`).
    layers : tuple of MMoE
        The first layer (its gates are the model's), and the second of a two-layer
        block.
    gate_norm : {"batchnorm", "layernorm"}
        How the gates normalise their logits.
    params : dict
        ``first.<name>`` and ``second.<name>`` (the layers' factors; the first
        layer's gates), ``input_ln.weight`` and ``input_ln.bias`` with ``apply_ln``:
        arrays of the backend.
    state : tuple of BatchNormState or None
        The running statistics of each level (BatchNorm gates only).
    backend : str
        The backend of the arrays.

    Examples
    --------
    >>> import numpy as np
    >>> z = np.zeros
    >>> model = from_reference({"factors.0": np.ones((3, 2)), "factors.1": np.ones((5, 2)), "factors.2": np.ones((6, 2)),
    ...                         "projs.0": z((4, 3)), "bn.0.running_mean": z(3), "bn.0.running_var": np.ones(3),
    ...                         "bn.0.num_batches_tracked": np.array(0)}, dtype="float64")
    >>> y, state = model.apply(model.params, np.ones((2, 4)), state=model.state, training=True)
    >>> y.tolist(), int(state[0].count)
    ([[10.0, 10.0, 10.0, 10.0, 10.0, 10.0], [10.0, 10.0, 10.0, 10.0, 10.0, 10.0]], 1)
    """

    source: str
    layers: tuple[MMoE, ...]
    gate_norm: str
    params: dict[str, Any]
    state: tuple[BatchNormState, ...] | None
    backend: str

    def _split(self, params: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
        parts = []
        for k, layer in enumerate(self.layers):
            head = ("first.", "second.")[k]
            own = {name[len(head):]: v for name, v in params.items() if name.startswith(head)}
            if k:  # the second layer's gates: not in the reference (it reuses the coefficients), never read
                own = {**layer.params, **own}
            parts.append(own)
        return tuple(parts)

    def apply(
        self, params: Mapping[str, Any], x: Any, *, state: tuple[BatchNormState, ...] | None = None,
        training: bool = False,
    ) -> tuple[Any, tuple[BatchNormState, ...] | None]:
        """The reference module's forward: ``(y[..., O], state)``.

        Parameters
        ----------
        params : mapping
            As ``ReferenceModel.params`` (the model's own, or any of the same names and shapes).
        x : array ``[..., I]``
            Input of the model's backend and dtype.  Every leading axis is a row of
            the BatchNorm's batch (the reference's ``B * T``).
        state : tuple of BatchNormState, optional
            Running statistics of BatchNorm gates (default: the model's ``state``).
        training : bool
            BatchNorm gates: normalise with the batch statistics and return the
            updated state (the reference's ``module.train()``), or with the running
            statistics (``module.eval()``).  No effect on LayerNorm gates.

        Returns
        -------
        y : array ``[..., O]``
            tensormoe's shape: the reference's ``MMoE.py`` squeezes a token axis of
            size 1, its ``MuMoE`` returns ``[B, 1, O]`` for ``[B, I]``.
        state : tuple of BatchNormState or None
            The statistics after the call (updated in training).

        Examples
        --------
        >>> import numpy as np
        >>> z = np.zeros
        >>> model = from_reference({"factors.0": np.ones((3, 2)), "factors.1": np.ones((4, 2)),
        ...                         "factors.2": np.ones((6, 2)), "projs.0": np.eye(4, 3),
        ...                         "bn.0.running_mean": z(3), "bn.0.running_var": np.ones(3),
        ...                         "bn.0.num_batches_tracked": np.array(0)}, dtype="float64")
        >>> x = np.random.default_rng(0).normal(size=(5, 4))
        >>> y, state = model.apply(model.params, x, training=True)
        >>> y.shape, state[0].mean.round(3).tolist(), int(state[0].count)
        ((5, 6), [-0.08, -0.031, 0.01], 1)
        """
        training = check_bool(training, "training")
        ops = get_ops(self.backend)
        first_layer = self.layers[0]
        parts = self._split(params)
        if self.gate_norm == "batchnorm":
            coefficients, state = first_layer.coefficients(
                parts[0], x, norm_state=self.state if state is None else state, training=training,
                return_norm_state=True, backend=self.backend,
            )
        else:
            coefficients = first_layer.coefficients(parts[0], x, backend=self.backend)
        if "input_ln.weight" in params:  # apply_ln: only the experts read LayerNorm(x)
            x = ops.layer_norm(x, EPS) * params["input_ln.weight"] + params["input_ln.bias"]
        y = first_layer.apply(parts[0], x, coefficients, backend=self.backend)
        if len(self.layers) > 1:
            y = self.layers[1].apply(parts[1], ops.gelu(y), coefficients, backend=self.backend)
        return y, state

    def __call__(self, x: Any, *, training: bool = False) -> Any:
        """:meth:`apply` with the model's own parameters and statistics; the output only.

        Examples
        --------
        >>> import numpy as np
        >>> z = np.zeros
        >>> state = {"MuMoE.factors.0": np.ones((3, 2)), "MuMoE.factors.1": np.ones((4, 2)),
        ...          "MuMoE.factors.2": np.ones((6, 2)), "projs.0": z((4, 3))}
        >>> from_reference(state, dtype="float64")(np.ones((2, 5, 4))).shape
        (2, 5, 6)
        """
        return self.apply(self.params, x, training=training)[0]


def _copy(value: Any) -> np.ndarray:
    # the model's arrays are its own: never views of the checkpoint's (a framework may share NumPy's memory)
    return np.array(to_numpy(value), copy=True)


def from_reference(
    state_dict: Mapping[str, Any],
    *,
    gate: str = "entmax15",
    prefix: str = "",
    dtype: str | None = None,
    backend: str | None = None,
) -> ReferenceModel:
    """A reference muMoE checkpoint as a tensormoe model computing the same function.

    Parameters
    ----------
    state_dict : mapping of str to array
        The reference module's ``state_dict()`` (read by :func:`read_state_dict`:
        every tensor mapped, anything else refused by name).
    gate : {"entmax15", "softmax", "sparsemax"}
        The reference module's ``act`` (not in its state dict).
    prefix : str
        Read only the names under this prefix (one layer of a whole model).
    dtype : str, optional
        The parameters' dtype (default: the checkpoint's factors').
    backend : str, optional
        The backend of the model (default: the current one).

    Returns
    -------
    ReferenceModel

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> cores = [rng.normal(size=s) for s in [(4, 8, 2), (2, 5, 3), (3, 6, 4)]]
    >>> state = {**{f"MuMoE.factors.{k}": c for k, c in enumerate(cores)}, "projs.0": rng.normal(size=(4, 8)),
    ...          "bn.0.running_mean": rng.normal(size=8), "bn.0.running_var": np.ones(8),
    ...          "bn.0.num_batches_tracked": np.array(10)}
    >>> model = from_reference(state)
    >>> model.source, type(model.layers[0]).__name__, model.layers[0].dtype
    ('MuMoE.TRMuMoE', 'TRMMoE', 'float64')
    >>> model(rng.normal(size=(3, 4))).shape
    (3, 6)
    """
    checkpoint = read_state_dict(state_dict, gate=gate, prefix=prefix)
    backend = get_backend() if backend is None else backend
    ops = get_ops(backend)
    dtype = checkpoint.dtype if dtype is None else check_dtype(dtype)
    layers, params = [], {}
    for k, (config, loaded) in enumerate(zip(checkpoint.configs, checkpoint.params)):
        # the second layer's gates are never read (it takes the first layer's coefficients)
        layer = layer_from_config({**config, "gate_norm": None if k else config["gate_norm"], "dtype": dtype})
        own = {name: ops.asarray(_copy(value), dtype) for name, value in loaded.items()}
        if k:
            own.update({name: ops.asarray(np.zeros(shape), dtype) for name, shape in layer.param_shapes().items()
                        if name not in own})
        layer.params = own
        layers.append(layer)
        params.update({f"{('first.', 'second.')[k]}{name}": value for name, value in loaded.items()})
    params = {name: ops.asarray(_copy(value), dtype) for name, value in params.items()}
    if checkpoint.input_ln is not None:
        params["input_ln.weight"], params["input_ln.bias"] = (ops.asarray(_copy(v), dtype) for v in checkpoint.input_ln)
    state = None
    if checkpoint.gate_norm_state is not None:
        state = tuple(
            BatchNormState(ops.asarray(_copy(s.mean), dtype), ops.asarray(_copy(s.var), dtype),
                           ops.asarray(np.asarray(to_numpy(s.count), dtype=np.int64)))
            for s in checkpoint.gate_norm_state
        )
        layers[0].norm_state = state  # the first layer alone computes the checkpoint's gates too
    return ReferenceModel(
        source=checkpoint.source,
        layers=tuple(layers),
        gate_norm=checkpoint.configs[0]["gate_norm"],
        params=params,
        state=state,
        backend=backend,
    )
