"""Matched ranks fit the budget, and the next rank of the same family would not."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

import tensormoe
from tensormoe.tools import ranks
from tensormoe.accounting import make_factorization


def layer_params(kind, in_dim, out_dim, experts, r, bias, count_gates):
    """Parameters counted from the factorization's shapes, independently of ranks.py."""
    n = make_factorization(kind, in_dim, out_dim, experts, r, bias=bias).n_params()
    return n + (in_dim * sum(experts) if count_gates else 0)


@st.composite
def problems(draw):
    levels = draw(st.integers(1, 3))
    experts = draw(st.lists(st.integers(1, 40), min_size=levels, max_size=levels))
    in_dim, out_dim = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    bias, count_gates = draw(st.booleans()), draw(st.booleans())
    budget = draw(st.one_of(st.just("linear"), st.floats(1e-4, 1.0), st.integers(1, 2_000_000)))
    bond_rank = draw(st.one_of(st.none(), st.integers(1, 6)))
    return dict(in_dim=in_dim, out_dim=out_dim, experts=experts, bias=bias, count_gates=count_gates,
                budget=budget, bond_rank=bond_rank)


def next_up(kind, r, m, experts, p):
    """The family member after ``r`` (the ranks the matcher must have rejected), or None past its end."""
    dims = [*experts, p["in_dim"] + int(p["bias"]), p["out_dim"]]
    if kind == "cp":
        return r + 1
    if kind == "tucker":
        return None if r >= max(dims) else [min(r + 1, d) for d in dims]
    bonds = list(m.ranks)
    if p["bond_rank"] is None:
        return [1 if (kind == "tt" and k in (0, len(bonds) - 1)) else b + 1 for k, b in enumerate(bonds)]
    bonds[-2] += 1
    return bonds


@given(p=problems())
def test_matched_ranks_meet_the_budget_as_closely_as_the_family_allows(p):
    total = ranks.resolve_budget(p["budget"], p["in_dim"], p["out_dim"], p["experts"], bias=p["bias"])
    for kind in ranks.KINDS:
        bond_rank = p["bond_rank"] if kind in ("tt", "tr") else None
        try:
            m = ranks.match_rank(kind, p["in_dim"], p["out_dim"], p["experts"], p["budget"], bias=p["bias"],
                                 count_gates=p["count_gates"], bond_rank=bond_rank)
        except ValueError as err:  # only when even the smallest member exceeds the budget
            smallest = ranks.minimum_params(kind, p["in_dim"], p["out_dim"], p["experts"], bias=p["bias"],
                                            count_gates=p["count_gates"], bond_rank=bond_rank)
            assert smallest > total
            assert f"at least {smallest:,}" in str(err)
            continue
        count = layer_params(kind, p["in_dim"], p["out_dim"], p["experts"], m.ranks, p["bias"], p["count_gates"])
        assert m.budget == total
        assert m.params == count <= total
        bigger = next_up(kind, m.rank, m, p["experts"], p)
        if bigger is not None:
            assert layer_params(kind, p["in_dim"], p["out_dim"], p["experts"], bigger, p["bias"],
                                p["count_gates"]) > total


@given(in_dim=st.integers(1, 2000), out_dim=st.integers(1, 2000), n=st.integers(1, 512),
       budget=st.integers(10_000, 10_000_000))
def test_cp_rank_is_the_closed_form(in_dim, out_dim, n, budget):
    """The reference's rule, rounded down: R = floor((budget - I*N) / (N + I + 1 + O))."""
    expected = (budget - in_dim * n) // (n + in_dim + 1 + out_dim)
    if expected < 1:
        with pytest.raises(ValueError, match="budget"):
            ranks.match_rank("cp", in_dim, out_dim, [n], budget)
    else:
        assert ranks.match_rank("cp", in_dim, out_dim, [n], budget).ranks == expected


def test_budgets_resolve_to_parameter_counts():
    assert ranks.resolve_budget("linear", 768, 1000, 64) == 768 * 1000 + 1000
    assert ranks.resolve_budget("linear", 768, 1000, 64, bias=False) == 768 * 1000
    assert ranks.resolve_budget(1.0, 5, 3, [2, 4]) == 2 * 4 * 6 * 3
    assert ranks.resolve_budget(0.25, 5, 3, [2, 4], bias=False) == math.floor(0.25 * 2 * 4 * 5 * 3)
    assert ranks.resolve_budget(12345, 5, 3, [2]) == 12345


def test_reference_tr_rule_solves_the_input_output_bond():
    """TR with r1 = r2 = 4 (the reference's I=768, O=1000 setting): solve the last bond, budget kept."""
    m = ranks.match_rank("tr", 768, 1000, [64], "linear", bond_rank=4)
    assert m.ranks[:2] == [4, 4] and m.ranks[-1] == 4
    r = m.ranks[2]
    assert 4 * 64 * 4 + 4 * 769 * r + r * 1000 * 4 + 768 * 64 <= 769_000
    assert 4 * 64 * 4 + 4 * 769 * (r + 1) + (r + 1) * 1000 * 4 + 768 * 64 > 769_000


def test_match_builds_the_layer_it_counted():
    with tensormoe.backend_context("numpy"):
        for kind, m in ranks.match_ranks(24, 16, [6, 3], 4000).items():
            layer = m.layer(seed=0)
            assert layer.n_params == m.params <= 4000, kind
            assert m.cost(batch_size=2).params == m.params


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(budget=True), TypeError, "budget"),
        (dict(budget="half"), ValueError, "budget='half'"),
        (dict(budget=0), ValueError, "budget"),
        (dict(budget=1.5), ValueError, r"\(0, 1\]"),
        (dict(budget=-0.1), ValueError, "budget"),
        (dict(budget=[1]), TypeError, "budget"),
        (dict(budget=100), ValueError, "at least 12,312"),
        (dict(budget="linear", bond_rank=2), ValueError, "bond_rank"),
    ],
)
def test_impossible_or_bad_budgets_are_explained(kwargs, error, match):
    # cp, 768 -> 8, 15 experts: the smallest layer (rank 1) needs (15 + 769 + 8) + 768 * 15 gates = 12,312
    with pytest.raises(error, match=match):
        ranks.match_rank("cp", 768, 8, [15], **kwargs)
