"""The catalogue of invalid calls: each one's backend, call, error type, argument and received value.

``tests/test_validation.py`` runs every case and checks that it raises exactly the
stated error, naming the argument and the value received; the same run renders
the table of ``docs/guides/robustness.md`` (``python tests/test_validation.py
--write-docs`` rewrites it), so the documented messages cannot drift from the code.

A call is a Python expression evaluated in :func:`namespace` on its backend:
``layer`` is ``CPMMoE(4, 3, [5, 2], rank=2)`` (two expert levels), ``x`` a valid
input ``[2, 4]``, ``a`` valid coefficients, ``params`` the layer's parameters,
``np``/``torch``/``jnp`` the frameworks and every public name of tensormoe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import warnings

import numpy as np

import tensormoe
from tensormoe.network.factorizations import OverparameterizedWarning, RankWarning
from tensormoe.ops import get_ops
from tensormoe.validation import MAX_BYTES_ENV


@dataclasses.dataclass(frozen=True)
class Case:
    backend: str
    call: str
    error: type
    argument: str
    got: str


def C(backend, call, error, argument, got):
    return Case(backend, call, error, argument, got)


V, T, W, R = ValueError, TypeError, OverparameterizedWarning, RankWarning

#: The memory limit the cases run with (the default, a quarter of physical memory, varies between machines).
MAX_BYTES = "8GiB"

CASES = [
    # -- layer constructors -----------------------------------------------------------------
    C("numpy", "CPMMoE(0, 3, [5], rank=2)", V, "in_dim", "got 0"),
    C("numpy", "CPMMoE(4.5, 3, [5], rank=2)", T, "in_dim", "got 4.5 of type float"),
    C("numpy", "CPMMoE(True, 3, [5], rank=2)", T, "in_dim", "got True of type bool"),
    C("numpy", "CPMMoE('4', 3, [5], rank=2)", T, "in_dim", "got '4' of type str"),
    C("numpy", "CPMMoE(4, -1, [5], rank=2)", V, "out_dim", "got -1"),
    C("numpy", "CPMMoE(4, 3, [], rank=2)", V, "expert_dims", "got []"),
    C("numpy", "CPMMoE(4, 3, [5, 0], rank=2)", V, "expert_dims[1]", "got 0"),
    C("numpy", "CPMMoE(4, 3, [5, 2.0], rank=2)", T, "expert_dims[1]", "got 2.0 of type float"),
    C("numpy", "CPMMoE(4, 3, '5', rank=2)", T, "expert_dims", "got '5' of type str"),
    C("numpy", "CPMMoE(4, 3, None, rank=2)", T, "expert_dims", "got None"),
    C("numpy", "CPMMoE(4, 3, [5, 5], rank=2, hierarchy=3)", V, "hierarchy", "hierarchy=3"),
    C("numpy", "CPMMoE(4, 3, 5, rank=2, hierarchy=0)", V, "hierarchy", "got 0"),
    C("numpy", "CPMMoE(4, 3, [5], rank=0)", V, "rank", "got 0"),
    C("numpy", "CPMMoE(4, 3, [5], rank=2.5)", T, "rank", "got 2.5 of type float"),
    C("numpy", "CPMMoE(4, 3, [5], rank=True)", T, "rank", "got True of type bool"),
    C("numpy", "CPMMoE(4, 3, [5], rank=2**62)", V, "rank", "rank=4611686018427387904"),
    C("numpy", "CPMMoE(4, 3, [5], rank=2, bias=1)", T, "bias", "got 1 of type int"),
    C("numpy", "CPMMoE(4, 3, [5], rank=2, gate='relu')", V, "gate", "gate='relu'"),
    C("numpy", "CPMMoE(4, 3, [5], rank=2, gate=None)", T, "gate", "got None"),
    C("numpy", "CPMMoE(4, 3, [5], rank=2, gate_norm='bn')", V, "gate_norm", "gate_norm='bn'"),
    C("numpy", "CPMMoE(4, 3, [5], rank=2, gate_norm='batchnorm', router='top2')", V, "router", "router='top2'"),
    C("numpy", "CPMMoE(4, 3, [5], rank=2, gate_norm='batchnorm').apply(None, x, training=True)", V,
      "return_norm_state", "training=True"),
    C("numpy", "CPMMoE(4, 3, [5], rank=2, init_std=-1)", V, "init_std", "got -1.0"),
    C("numpy", "CPMMoE(4, 3, [5], rank=2, init_std=float('nan'))", V, "init_std", "got nan"),
    C("numpy", "CPMMoE(4, 3, [5], rank=2, init_std='0.1')", T, "init_std", "got '0.1' of type str"),
    C("numpy", "CPMMoE(4, 3, [5], rank=2, init_std=1e300)", V, "init_std", "init_std=1e+300"),
    C("numpy", "CPMMoE(4, 3, [5], rank=2, dtype='int32')", V, "dtype", "dtype='int32'"),
    C("numpy", "CPMMoE(4, 3, [5], rank=2, dtype='float')", V, "dtype", "dtype='float'"),
    C("numpy", "CPMMoE(4, 3, [5], rank=2, dtype=32)", T, "dtype", "got 32 of type int"),
    C("numpy", "CPMMoE(4, 3, [5], rank=2, dtype='bfloat16')", T, "dtype", "dtype='bfloat16'"),
    C("numpy", "CPMMoE(4, 3, [5], rank=2, seed=-1)", V, "seed", "got -1"),
    C("numpy", "CPMMoE(4, 3, [5], rank=2, seed=1.5)", T, "seed", "got 1.5 of type float"),
    C("numpy", "CPMMoE(4, 3, [5], rank=2, optimize='fastest')", V, "optimize", "optimize='fastest'"),
    C("numpy", "CPMMoE(4, 3, [5], rank=2, optimize=None)", T, "optimize", "got None"),
    C("numpy", "CPMMoE(4, 3, [5], rank=2, check_finite='yes')", T, "check_finite", "got 'yes' of type str"),
    C("numpy", "TuckerMMoE(4, 3, [5], ranks=[2, 2])", V, "ranks", "got 2 entries [2, 2]"),
    C("numpy", "TuckerMMoE(4, 3, [5, 2], ranks=[2, 2, 2])", V, "ranks", "got 3 entries [2, 2, 2]"),
    C("numpy", "TuckerMMoE(4, 3, [5], ranks=[2, 0, 2])", V, "ranks[1]", "got 0"),
    C("numpy", "TuckerMMoE(4, 3, [5], ranks=2.0)", T, "ranks", "got 2.0 of type float"),
    C("numpy", "TTMMoE(4, 3, [5], ranks=[2, 2, 2, 1])", V, "ranks", "got r_0=2 and r_3=1"),
    C("numpy", "TTMMoE(4, 3, [5], ranks=[2, 2, 2, 2, 2, 2])", V, "ranks", "got 6 entries"),
    C("numpy", "TTMMoE(4, 3, [5, 2], ranks=[2, 2])", V, "ranks", "got 2 entries [2, 2]"),
    C("numpy", "TTMMoE(4, 3, [5], ranks=[[1, 5, 2], [2, 5, 3], [3, 3, 2]])", V, "ranks", "r_3=2"),
    C("numpy", "TTMMoE(4, 3, [5], ranks=[[1, 5, 2], [2, 5, 3]])", V, "ranks", "got 2"),
    C("numpy", "TTMMoE(4, 3, [5], ranks='3')", T, "ranks", "got '3' of type str"),
    C("numpy", "TTMMoE(4, 3, [5], ranks=0)", V, "ranks", "got 0"),
    C("numpy", "TRMMoE(4, 3, [5], ranks=[2, 3, 4, 5])", V, "ranks", "got r_0=2 and r_d=5"),
    C("numpy", "TRMMoE(4, 3, [5], ranks=[[2, 5, 3], [4, 5, 2], [2, 3, 2]])", V, "ranks[1][0]", "ranks[1][0]=4"),
    C("numpy", "TRMMoE(4, 3, [5], ranks=[[2, 0, 3], [3, 5, 2], [2, 3, 2]])", V, "ranks[0][1]", "got 0"),
    C("numpy", "TRMMoE(4, 3, [5], ranks=[[2, 'N', 3], [3, 5, 2], [2, 3, 2]])", T, "ranks[0][1]", "got 'N' of type str"),
    C("numpy", "TRMMoE(4, 3, [5], ranks=[[None, 5, 3], [3, 5, 2], [2, 3, 2]])", T, "ranks[0][0]", "got None"),
    C("numpy", "TRMMoE(4, 3, [5], ranks=[[2, 5, 3], [3, 5], [2, 3, 2]])", V, "ranks[1]", "got [3, 5]"),
    # -- sizes, before anything is allocated (the cases run with TENSORMOE_MAX_BYTES=8GiB) ---------
    C("numpy", "CPMMoE(6, 4, [10**9], rank=3)", V, "expert_dims", "expert_dims=[1000000000]"),
    C("numpy", "CPMMoE(6, 4, [128], rank=10**9)", V, "rank", "rank=1000000000"),
    C("numpy", "TTMMoE(6, 4, [128], ranks=10**5)", V, "ranks", "ranks=[1, 100000, 100000, 1]"),
    C("numpy", "TuckerMMoE(6, 4, [10**5, 10**5], ranks=[10**4, 10**4, 7, 4])", V, "ranks",
      "ranks=[10000, 10000, 7, 4]"),
    C("numpy", "CPMMoE(768, 768, [1024, 1024], rank=256, max_bytes=2**20)", V, "max_bytes", "max_bytes=1048576"),
    C("numpy", "CPMMoE(4, 3, [5], rank=2, max_bytes=0)", V, "max_bytes", "got 0"),
    C("numpy", "CPMMoE(4, 3, [5], rank=2, max_bytes=1e9)", T, "max_bytes", "got 1000000000.0 of type float"),
    # wasteful ranks: a warning (raised as an error here), not an error
    C("numpy", "CPMMoE(64, 32, [128], rank=5000)", W, "rank", "rank=5000"),
    C("numpy", "TTMMoE(64, 32, [128], ranks=1000)", W, "ranks", "ranks=[1, 1000, 1000, 1]"),
    # the reference implementation's rank spellings: read as it reads them, with a warning (raised here)
    C("numpy", "TuckerMMoE(4, 3, [5], ranks=[2, 6, 2])", R, "ranks[1]", "ranks[1]=6"),
    C("numpy", "TRMMoE(4, 3, [5], ranks=[[2, 9, 3], [3, 5, 2], [2, 3, 2]])", R, "ranks[0][1]", "ranks[0][1]=9"),
    C("numpy", "TTMMoE(6, 4, [3], ranks=[[1, 3, 2], [2, 5, 5], [5, 4, 1]], bias=False)", R, "ranks[1][1]",
      "ranks[1][1]=5"),
    # -- factorizations ---------------------------------------------------------------------
    C("numpy", "CP(5, rank=2, n_expert_modes=1)", T, "dims", "got 5 of type int"),
    C("numpy", "CP([5, 4], rank=2, n_expert_modes=1)", V, "dims", "got 2: [5, 4]"),
    C("numpy", "CP([5, 4, 3], rank=2, n_expert_modes=0)", V, "n_expert_modes", "got 0"),
    C("numpy", "CP([5, 4, 3], rank=2, n_expert_modes=1).init(None, 1.0)", T, "rng", "got None"),
    C("numpy", "CP([5, 4, 3], rank=2, n_expert_modes=1).init(np.random.default_rng(0), 0.0)", V, "std", "got 0.0"),
    C("numpy", "CP([5, 4, 3], rank=2, n_expert_modes=1).to_dense({})", V, "params", "is missing factor_0"),
    C("numpy", "CP([2, 2, 2], rank=1, n_expert_modes=1).to_dense({'factor_0': np.ones((2, 1)), "
               "'factor_1': np.ones((2, 1)), 'factor_2': [[1.0], [1.0]]})", T, "params['factor_2']", "of type list"),
    # -- inputs -----------------------------------------------------------------------------
    C("numpy", "layer(np.ones((2, 5), dtype='float32'))", V, "x", "got shape (2, 5)"),
    C("numpy", "layer(np.array(1.0, dtype='float32'))", V, "x", "got shape ()"),
    C("numpy", "layer(np.ones((2, 4), dtype='int64'))", T, "x", "got dtype int64"),
    C("numpy", "layer(np.ones((2, 4), dtype=bool))", T, "x", "got dtype bool"),
    C("numpy", "layer(np.ones((2, 4), dtype='complex64'))", T, "x", "got dtype complex64"),
    C("numpy", "layer(np.ones((2, 4), dtype='float64'))", T, "x", "has dtype float64"),
    C("numpy", "layer([[1.0, 2.0, 3.0, 4.0]])", T, "x", "got [[1.0, 2.0, 3.0, 4.0]] of type list"),
    C("numpy", "layer(np.float32(1.0))", T, "x", "of type float32"),
    C("numpy", "layer(None)", T, "x", "got None"),
    C("pytorch", "layer(np.ones((2, 4), dtype='float32'))", T, "x", "x is a numpy array"),
    C("pytorch", "layer(torch.ones(2, 4, dtype=torch.float16))", T, "x", "has dtype float16"),
    C("pytorch", "layer(torch.ones(2, 4, device='meta'))", V, "x", "on device meta"),
    C("jax", "layer(torch.ones(2, 4))", T, "x", "x is a pytorch array"),
    C("jax", "layer(jnp.ones((2, 4), dtype='int32'))", T, "x", "got dtype int32"),
    C("numpy", "layer.coefficients(None, np.ones((2, 5), dtype='float32'))", V, "x", "got shape (2, 5)"),
    C("numpy", "layer.dense_forward(None, np.ones(4, dtype='float16'))", T, "x", "has dtype float16"),
    # -- expert coefficients ----------------------------------------------------------------
    C("numpy", "layer(x, coefficients=a[0])", T, "coefficients", "got a numpy array of shape (2, 5)"),
    C("numpy", "layer(x, coefficients=[a[0]])", V, "coefficients", "got a list of 1"),
    C("numpy", "layer(x, coefficients=[a[0][:, :3], a[1]])", V, "coefficients[0]", "got shape (2, 3)"),
    C("numpy", "layer(x, coefficients=[a[0][:1], a[1]])", V, "coefficients[0]", "got [1, 5]"),
    C("numpy", "layer(x, coefficients=[a[0], a[1].astype('float64')])", T, "coefficients[1]", "has dtype float64"),
    C("numpy", "layer(x, coefficients=[a[0], a[1].astype('int32')])", T, "coefficients[1]", "got dtype int32"),
    C("numpy", "layer(x, coefficients=[a[0], [[0.5, 0.5]] * 2])", T, "coefficients[1]", "of type list"),
    C("pytorch", "layer(x, coefficients=[a[0], np.ones((2, 2), dtype='float32')])", T, "coefficients[1]",
      "is a numpy array"),
    # -- parameters -------------------------------------------------------------------------
    C("numpy", "layer.apply({}, x)", V, "params", "is missing factor_0"),
    C("numpy", "layer.apply({**params, 'extra': params['gate_0']}, x)", V, "params", "has unexpected extra"),
    C("numpy", "layer.apply({**params, 'factor_0': np.ones((5, 3), dtype='float32')}, x)", V, "params['factor_0']",
      "has shape (5, 3)"),
    C("numpy", "layer.apply(convert_params(params, dtype='float64'), x)", T, "params['factor_0']",
      "has dtype float64"),
    C("numpy", "layer.apply([params], x)", T, "params", "got a list of 1 items"),
    C("pytorch", "layer.apply(convert_params(params, 'numpy'), x)", T, "params['factor_0']", "is a numpy array"),
    C("pytorch", "setattr(layer, 'params', {**params, 'gate_1': np.zeros((4, 2), dtype='float32')})", T,
      "params['gate_1']", "is a numpy array"),
    C("numpy", "layer.check_params([])", T, "params", "got [] of type list"),
    C("numpy", "layer.init(-1)", V, "seed", "got -1"),
    C("numpy", "layer.plan(0)", V, "batch_size", "got 0"),
    C("numpy", "layer.plan(2.0)", T, "batch_size", "got 2.0 of type float"),
    C("numpy", "layer.expert_weight(None, 3)", V, "index", "got 1: [3]"),
    C("numpy", "layer.expert_weight(None, (5, 0))", V, "index[0]", "index[0]=5"),
    C("numpy", "layer.expert_weight(None, (-1, 0))", V, "index[0]", "index[0]=-1"),
    C("numpy", "layer.expert_weight(None, (1.0, 0))", T, "index[0]", "got 1.0 of type float"),
    C("numpy", "layer.expert_weight(None, '10')", T, "index", "got '10' of type str"),
    # -- NaN / Inf (opt-in check) -----------------------------------------------------------
    C("numpy", "checked(np.array([[1.0, np.nan, 0.0, 0.0]], dtype='float32'))", V, "x", "holds 1 non-finite value"),
    C("numpy", "checked(x, coefficients=[a[0], a[1] * np.inf])", V, "coefficients[1]", "holds 4 non-finite values"),
    C("numpy", "checked.apply({**params, 'factor_2': params['factor_2'] * np.nan}, x)", V, "params['factor_2']",
      "holds 10 non-finite values"),
    C("numpy", "CPMMoE(4, 3, [5], rank=2, dtype='float16', check_finite=True)"
               "(np.full((2, 4), 6e4, dtype='float16'))", V, "result", "overflowed float16"),
    C("jax", "jax.jit(checked)(x)", T, "check_finite", "is a JAX tracer"),
    # -- gates ------------------------------------------------------------------------------
    C("numpy", "softmax([1.0, 2.0])", T, "z", "got [1.0, 2.0] of type list"),
    C("numpy", "softmax(np.zeros((2, 0)))", V, "z", "got shape (2, 0)"),
    C("numpy", "entmax15(np.array([1, 2]))", T, "z", "got dtype int64"),
    C("numpy", "sparsemax(np.array(1.0))", V, "z", "got shape ()"),
    C("numpy", "layer_norm(np.ones(3), eps=-1.0)", V, "eps", "got -1.0"),
    C("numpy", "softmax(np.ones(3), ops='numpy')", T, "ops", "got 'numpy' of type str"),
    C("pytorch", "entmax15(np.ones(3))", T, "z", "z is a numpy array"),
    # -- contraction planning ---------------------------------------------------------------
    C("numpy", "get_plan(3, (2, 3))", T, "equation", "got 3 of type int"),
    C("numpy", "get_plan('ab,bc->ac', (2, 3))", V, "equation", "1 shapes were given"),
    C("numpy", "get_plan('ab,bc->ac', (2, 3), (4, 5))", V, "shapes[1][0]", "shapes[1][0]=4"),
    C("numpy", "get_plan('ab->a', (2, -3))", V, "shapes[0]", "got (2, -3)"),
    C("numpy", "get_plan('ab->a', (2, 3, 4))", V, "shapes[0]", "shapes[0]=(2, 3, 4) has 3 axes"),
    C("numpy", "get_plan('ab->a', '23')", T, "shapes[0]", "got '23' of type str"),
    C("numpy", "get_plan('ab->c', (2, 3))", V, "equation", "equation='ab->c'"),
    C("numpy", "get_plan('ab->a', (2, 3), backend='tensorflow')", V, "backend", "backend='tensorflow'"),
    C("numpy", "get_plan('ab->a', (2, 3), dtype='float')", V, "dtype", "dtype='float'"),
    C("numpy", "get_plan('ab->a', (2, 3), dtype=np.float32)", T, "dtype", "of type type"),
    C("numpy", "get_plan('ab->a', (2, 3), optimize='fastest')", V, "optimize", "optimize='fastest'"),
    C("numpy", "get_plan('ij,jk->ik', (2, 2), (2, 3))(np.eye(2), np.ones((2, 4)), backend='numpy')", V,
      "operands[1]", "has shape (2, 4)"),
    C("numpy", "get_plan('ij,jk->ik', (2, 2), (2, 3))(np.eye(2), backend='numpy')", V, "operands", "got 1"),
    C("numpy", "contract('ij,jk->ik', np.eye(2), [[1.0]], backend='numpy', dtype='float64')", T, "operands[1]",
      "got [[1.0]] of type list"),
    # -- backend flag -----------------------------------------------------------------------
    C("numpy", "set_backend('tensorflow')", V, "backend", "backend='tensorflow'"),
    C("numpy", "set_backend(3)", T, "backend", "got 3 of type int"),
    C("numpy", "enter(backend_context(None))", T, "backend", "got None of type NoneType"),
    C("numpy", "get_ops('tf')", V, "name", "name='tf'"),
    # -- parameter conversion ---------------------------------------------------------------
    C("numpy", "convert_params([], 'numpy')", T, "params", "got [] of type list"),
    C("numpy", "convert_params({'w': ['a']})", T, "params['w']", "got ['a'] of type list"),
    C("numpy", "convert_params({'w': np.ones(2)}, 'tensorflow')", V, "backend", "backend='tensorflow'"),
    C("numpy", "convert_params({'w': np.ones(2)}, 'numpy', 'int8')", V, "dtype", "dtype='int8'"),
    C("numpy", "convert_params({'w': np.ones(2)}, 'numpy', 'bfloat16')", T, "dtype", "dtype='bfloat16'"),
    C("jax", "convert_params({'w': np.ones(2)}, 'jax', 'float64')", T, "dtype", "dtype='float64'"),
    # -- numerics ---------------------------------------------------------------------------
    C("numpy", "unit_roundoff('int8')", V, "dtype", "dtype='int8'"),
]


def enter(context):
    """Enter and leave a context manager (so that a call string can use one)."""
    with context:
        pass


def namespace(backend: str) -> dict:
    """Names a call can use, built on ``backend`` (call inside ``backend_context(backend)``)."""
    from tensormoe import contraction, numerics

    ops = get_ops(backend)
    layer = tensormoe.CPMMoE(4, 3, [5, 2], rank=2)
    ns = {name: getattr(tensormoe, name) for name in tensormoe.__all__}
    ns.update(
        np=np,
        tm=tensormoe,
        contract=contraction.contract,
        get_ops=get_ops,
        unit_roundoff=numerics.unit_roundoff,
        enter=enter,
        layer=layer,
        checked=tensormoe.CPMMoE(4, 3, [5, 2], rank=2, check_finite=True),
        params=layer.params,
        x=ops.asarray(np.ones((2, 4)), "float32"),
        a=[ops.asarray(np.full((2, n), 1.0 / n), "float32") for n in (5, 2)],
    )
    for module, alias in [("torch", "torch"), ("jax", "jax"), ("jax.numpy", "jnp")]:
        if backend in ("pytorch", "jax") and importlib.util.find_spec(module.split(".")[0]):
            ns[alias] = importlib.import_module(module)
    return ns


@contextlib.contextmanager
def _max_bytes(value: str):
    old = os.environ.get(MAX_BYTES_ENV)
    os.environ[MAX_BYTES_ENV] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[MAX_BYTES_ENV]
        else:
            os.environ[MAX_BYTES_ENV] = old


def run(case: Case) -> BaseException | None:
    """Run ``case`` on its backend; return the exception (or the warning, raised) it gave (``None`` if none)."""
    with tensormoe.backend_context(case.backend), np.errstate(all="ignore"), warnings.catch_warnings():
        # the warning cases raise it; elsewhere (rank=10**9 warns, then is refused for its size) it is silenced
        for category in (W, R):
            warnings.simplefilter("error" if case.error is category else "ignore", category)
        ns = namespace(case.backend)
        with _max_bytes(MAX_BYTES):
            try:
                eval(case.call, ns)  # noqa: S307  (the calls are this file's own literals)
            except Exception as err:  # noqa: BLE001  (the test inspects the type)
                return err
    return None


TABLE_START = "<!-- invalid-cases:start (generated by tests/test_validation.py --write-docs) -->"
TABLE_END = "<!-- invalid-cases:end -->"


def _cell(text: str) -> str:
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def row(case: Case, err: BaseException | None) -> str:
    """The markdown table row of ``case`` given the exception it raised."""
    message = f"{type(err).__name__}: {err}" if err is not None else "no error"
    return f"| {case.backend} | {_cell(case.call)} | {_cell(message)} |"


def table(rows: list[str]) -> str:
    """The generated block of the guide: markers, header and one row per case."""
    head = "| backend | call | error and message |\n| --- | --- | --- |"
    return "\n".join([TABLE_START, head, *rows, TABLE_END])
