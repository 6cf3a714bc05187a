"""Every invalid call raises the documented error naming the argument and the value; valid forms are accepted.

The catalogue of invalid calls lives in ``invalid_cases.py``; this file runs it and
keeps the table in ``docs/guides/robustness.md`` equal to what the code raises.
Run ``python tests/test_validation.py --write-docs`` to regenerate that table.
"""

from __future__ import annotations

import functools
import os
import pathlib
import sys

import numpy as np
import pytest
from helpers import BACKENDS, to_numpy

import invalid_cases
import tensormoe
from invalid_cases import CASES, TABLE_END, TABLE_START
from tensormoe.ops import get_ops

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "guides" / "robustness.md"


@functools.cache
def outcome(case):
    return invalid_cases.run(case)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.backend}:{c.call}" for c in CASES])
def test_invalid_call_raises_documented_error(case):
    if case.backend not in BACKENDS:
        pytest.skip(f"{case.backend} not installed")
    err = outcome(case)
    assert err is not None, f"{case.call} raised nothing"
    assert type(err) is case.error, f"{case.call} raised {type(err).__name__}: {err}"
    message = str(err)
    assert case.argument in message, f"the message does not name {case.argument!r}: {message}"
    assert case.got in message, f"the message does not show the value received ({case.got!r}): {message}"
    assert any(word in message for word in ("must", "expected", "needs", "not supported")), message
    assert "\n" not in message


def test_documented_table_matches_the_code():
    """The table in the guide is what the code raises today (rows of missing backends are not checked)."""
    text = DOC.read_text()
    assert TABLE_START in text and TABLE_END in text, f"{DOC} lacks the generated table markers"
    documented = text[text.index(TABLE_START) : text.index(TABLE_END)].splitlines()[3:]
    rows = _rows()
    by_call = {}
    for line in documented:
        backend, call = (cell.strip() for cell in line.strip("|").split(" | ")[:2])
        by_call[f"{backend}:{call.strip('`')}"] = line
    assert set(by_call) == {f"{c.backend}:{c.call}" for c in CASES}, (
        "the documented cases differ from tests/invalid_cases.py; run: python tests/test_validation.py --write-docs"
    )
    stale = [key for key, row in rows.items() if by_call[key] != row]
    assert not stale, f"messages changed for {stale}; run: python tests/test_validation.py --write-docs"


def _rows() -> dict[str, str]:
    return {f"{c.backend}:{c.call}": invalid_cases.row(c, outcome(c)) for c in CASES if c.backend in BACKENDS}


# -- valid forms ---------------------------------------------------------------------------


def test_numpy_integers_and_arrays_are_accepted_as_sizes_and_ranks():
    i64, i32, u8 = np.int64, np.int32, np.uint8
    layer = tensormoe.CPMMoE(i64(4), i32(3), np.array([5, 2]), rank=u8(2), hierarchy=i64(2), seed=i64(1))
    assert (layer.in_dim, layer.out_dim, layer.expert_dims, layer.rank) == (4, 3, (5, 2), 2)
    assert all(type(v) is int for v in (layer.in_dim, layer.out_dim, layer.rank, *layer.expert_dims))
    assert tensormoe.TuckerMMoE(4, 3, [5], ranks=np.array([2, 3, 2])).factorization.ranks == (2, 3, 2)
    assert tensormoe.TTMMoE(4, 3, [5], ranks=np.array([[1, 5, 2], [2, 5, 3], [3, 3, 1]])).factorization.bonds == (
        1, 2, 3, 1)
    assert tensormoe.TRMMoE(4, 3, (5,), ranks=(2, 3, 4)).factorization.bonds == (2, 3, 4, 2)
    assert tensormoe.CPMMoE(4, 3, [5], rank=2, bias=np.bool_(False)).bias is False


def test_dtype_objects_are_accepted():
    assert tensormoe.CPMMoE(4, 3, [5], rank=2, dtype=np.float64).dtype == "float64"
    assert tensormoe.CPMMoE(4, 3, [5], rank=2, dtype=np.dtype("float16")).dtype == "float16"
    if "pytorch" in BACKENDS:
        import torch

        with tensormoe.backend_context("pytorch"):
            assert tensormoe.CPMMoE(4, 3, [5], rank=2, dtype=torch.bfloat16).dtype == "bfloat16"
    if "jax" in BACKENDS:
        import jax.numpy as jnp

        with tensormoe.backend_context("jax"):
            assert tensormoe.CPMMoE(4, 3, [5], rank=2, dtype=jnp.bfloat16).dtype == "bfloat16"


def test_backend_aliases_are_accepted_everywhere():
    assert get_ops("torch" if "pytorch" in BACKENDS else "numpy").name in BACKENDS
    plan = tensormoe.get_plan("ij,jk->ik", (2, 2), (2, 3), backend=" NumPy ")
    assert plan is tensormoe.get_plan("ij,jk->ik", (2, 2), (2, 3), backend="numpy")


LAYERS = {
    "cp": lambda **kw: tensormoe.CPMMoE(4, 3, [5, 2], rank=3, **kw),
    "tucker": lambda **kw: tensormoe.TuckerMMoE(4, 3, [5, 2], ranks=[3, 2, 3, 2], **kw),
    "tt": lambda **kw: tensormoe.TTMMoE(4, 3, [5, 2], ranks=3, **kw),
    "tr": lambda **kw: tensormoe.TRMMoE(4, 3, [5, 2], ranks=2, **kw),
}


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
def test_empty_batches_give_empty_outputs(backend, kind, lead):
    """x of shape (0, I) (or any batch with a zero) works on every path and gives (0, O)."""
    if backend == "jax" and lead != (0,):
        pytest.skip("JAX compiles every shape; (0,) suffices there")
    layer = LAYERS[kind]()
    ops = get_ops()
    x = ops.asarray(np.zeros((*lead, 4)), "float32")
    y = layer(x)
    assert tuple(y.shape) == (*lead, 3)
    assert tuple(layer.dense_forward(None, x).shape) == (*lead, 3)
    a = layer.coefficients(None, x)
    assert [tuple(c.shape) for c in a] == [(*lead, 5), (*lead, 2)]
    assert tuple(layer(x, coefficients=a).shape) == (*lead, 3)


def test_plan_checks_shapes_on_every_call():
    plan = tensormoe.get_plan("ij,jk->ik", (2, 2), (2, 3))
    with pytest.raises(ValueError, match=r"operands\[0\] has shape \(3, 2\)"):
        plan(np.ones((3, 2)), np.ones((2, 3)), backend="numpy")
    np.testing.assert_allclose(plan(np.eye(2), np.ones((2, 3)), backend="numpy"), np.ones((2, 3)))


def test_invalid_keys_never_reach_the_plan_cache():
    from tensormoe import contraction

    before = contraction.cache_info()["size"]
    for bad in [((2, -3),), ("23",), ((2, 3, 4),)]:
        with pytest.raises((TypeError, ValueError)):
            tensormoe.get_plan("ab->a", *bad)
    assert contraction.cache_info()["size"] == before


def test_validation_happens_before_any_work(backend):
    """A bad call leaves the layer usable and its cached conversions intact."""
    layer = tensormoe.CPMMoE(4, 3, [5], rank=2)
    ops = get_ops()
    x = ops.asarray(np.ones((2, 4)), "float32")
    y = to_numpy(layer(x))
    with pytest.raises(ValueError):
        layer(ops.asarray(np.ones((2, 5)), "float32"))
    with pytest.raises(TypeError):
        layer.params = {**layer.params, "gate_0": np.zeros((4, 5), dtype="float64")}
    np.testing.assert_array_equal(to_numpy(layer(x)), y)


# -- sizes before allocation ------------------------------------------------------------------


def test_memory_limit_comes_from_the_argument_the_environment_or_physical_memory(monkeypatch):
    from tensormoe.validation import MAX_BYTES_ENV, memory_limit

    monkeypatch.delenv(MAX_BYTES_ENV, raising=False)
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert memory_limit() == physical // 4
    for text, expected in [("123", 123), ("8GiB", 8 * 2**30), (" 1.5 gib ", 3 * 2**29), ("2MB", 2 * 10**6),
                           ("0.5KiB", 512), ("7b", 7), (".25 TiB", 2**38)]:
        monkeypatch.setenv(MAX_BYTES_ENV, text)
        assert memory_limit() == expected, text
        assert memory_limit(1000) == 1000  # the argument wins
    for text in ["lots", "-1", "0", "1e9", "8 GiBs", "0.1B"]:
        monkeypatch.setenv(MAX_BYTES_ENV, text)
        with pytest.raises(ValueError, match=f"{MAX_BYTES_ENV}={text!r} is not a size"):
            memory_limit()
    with pytest.raises(ValueError, match="max_bytes must be a positive integer; got -5"):
        memory_limit(-5)


def test_check_memory_counts_in_python_integers():
    from tensormoe.validation import check_memory

    shapes = {"a": (2**32, 2**32), "b": (3,)}  # 2**64 elements: an int64 product would wrap to 0
    with pytest.raises(ValueError, match=r"18,446,744,073,709,551,619 parameters, 36,893,488,147,419,103,238 bytes"):
        check_memory(shapes, {"a": "bfloat16", "b": "float16"}, "x", max_bytes=2**64)
    assert check_memory({"a": (3, 0), "b": (5,)}, "float64", "x", max_bytes=40) == 40


def test_a_refused_layer_allocates_nothing():
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"expert_dims=\[10000000\].* expected at most 1,000,000 bytes"):
            tensormoe.CPMMoE(6, 4, [10**7], rank=3, max_bytes=10**6)  # 360 MB of float32
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, peak  # NumPy reports its allocations to tracemalloc: none was made


def test_ranks_that_save_nothing_warn(recwarn):
    from tensormoe.factorizations import OverparameterizedWarning

    with pytest.warns(OverparameterizedWarning, match=r"rank=5000 with dims=\[128, 65, 32\] give 1,125,000"):
        tensormoe.CPMMoE(64, 32, [128], rank=5000, max_bytes=2**30)
    with pytest.warns(OverparameterizedWarning, match=r"rank=4 with dims=\[3, 3, 3\] give 36 factorized parameters"):
        tensormoe.CPMMoE(2, 3, [3], rank=4)
    tensormoe.CPMMoE(2, 3, [3], rank=3)  # 3 * (3 + 3 + 3) = 27 = 3 * 3 * 3: as many as W, no warning
    assert not [w for w in recwarn if w.category is OverparameterizedWarning]


if __name__ == "__main__":
    if "--write-docs" not in sys.argv:
        sys.exit("usage: python tests/test_validation.py --write-docs")
    missing = sorted({c.backend for c in CASES} - set(BACKENDS))
    if missing:
        sys.exit(f"the table needs every backend; not installed: {missing}")
    text = DOC.read_text()
    start, end = text.index(TABLE_START), text.index(TABLE_END) + len(TABLE_END)
    DOC.write_text(text[:start] + invalid_cases.table(list(_rows().values())) + text[end:])
    print(f"wrote {len(CASES)} cases to {DOC}")
