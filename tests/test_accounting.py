"""Accounting equals what the layer holds and what opt_einsum plans for its operands."""

from __future__ import annotations


import numpy as np
import opt_einsum
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tensormoe
from tensormoe.layers import accounting
from tensormoe.layer import make_layer


@st.composite
def configs(draw):
    kind = draw(st.sampled_from(["cp", "tucker", "tt", "tr"]))
    levels = draw(st.integers(1, 3))
    experts = draw(st.lists(st.integers(1, 6), min_size=levels, max_size=levels))
    in_dim, out_dim = draw(st.integers(2, 7)), draw(st.integers(1, 7))
    if kind == "tucker":  # explicit ranks within the modes (no clipping, so bias on/off compare)
        ranks = [draw(st.integers(1, d)) for d in [*experts, in_dim, out_dim]]
    elif kind == "cp":
        ranks = draw(st.integers(1, 6))
    else:
        ranks = draw(st.integers(1, 4))
    return dict(kind=kind, in_dim=in_dim, out_dim=out_dim, experts=experts, ranks=ranks,
                bias=draw(st.booleans()), batch=draw(st.integers(1, 9)))


@given(cfg=configs())
def test_cost_counts_the_layers_arrays_and_its_plan(cfg):
    with tensormoe.backend_context("numpy"):
        layer = make_layer(cfg["kind"], cfg["in_dim"], cfg["out_dim"], cfg["experts"], cfg["ranks"], bias=cfg["bias"])
        c = layer.cost(cfg["batch"])
        params = layer.params
        gates = {k: v for k, v in params.items() if k.startswith("gate_")}
        factors = {k: v for k, v in params.items() if not k.startswith("gate_")}
        assert c.params == sum(a.size for a in params.values())
        assert c.gate_params == sum(a.size for a in gates.values())
        assert c.factor_params == sum(a.size for a in factors.values())
        assert c.dense_params == layer.dense_weight().size

        # FLOPs and peak from opt_einsum itself, on the operands the layer contracts
        b = cfg["batch"]
        operands = [np.ones((b, n)) for n in layer.expert_dims]
        operands.append(np.ones((b, cfg["in_dim"] + int(cfg["bias"]))))
        operands += [params[name] for name in layer.factorization.network()]
        _, info = opt_einsum.contract_path(layer.factorization.forward_equation(), *operands)
        assert c.forward_flops == info.opt_cost == layer.plan(b).flops
        assert c.peak_intermediate == info.largest_intermediate
        assert c.gate_flops == 2 * b * cfg["in_dim"] * sum(layer.expert_dims)
        assert c.linear_params == (cfg["in_dim"] + int(cfg["bias"])) * cfg["out_dim"]
        assert c.linear_flops == 2 * b * (cfg["in_dim"] + int(cfg["bias"])) * cfg["out_dim"]

        # the function form, without a layer, agrees field for field
        assert c == accounting.cost(cfg["kind"], cfg["in_dim"], cfg["out_dim"], cfg["experts"], cfg["ranks"],
                                    batch_size=b, bias=cfg["bias"])

        # the bias row: what a layer with a bias holds beyond the same layer without
        other = accounting.cost(cfg["kind"], cfg["in_dim"], cfg["out_dim"], cfg["experts"], cfg["ranks"],
                                bias=not cfg["bias"])
        with_bias, without = (c, other) if cfg["bias"] else (other, c)
        assert with_bias.bias_params == with_bias.factor_params - without.factor_params
        assert without.bias_params == 0


@pytest.mark.parametrize("rank", [64, 256])
def test_cp_flops_match_the_textbook_path(rank):
    """At B=64, I=O=768 the plan is the textbook CP path: three products, one Hadamard, one product."""
    b, n, i, o = 64, 64, 769, 768
    c = accounting.cost("cp", 768, 768, [n], rank, batch_size=b)
    assert c.forward_flops == 2 * b * rank * (n + i + o) + b * rank
    assert c.forward_flops < c.dense_flops


def test_large_layers_are_counted_without_building_them():
    c = accounting.cost("cp", 768, 768, [1024, 1024], 256, batch_size=64)
    assert c.dense_params == 1024 * 1024 * 769 * 768
    assert c.factor_params == 256 * (1024 + 1024 + 769 + 768)
    assert c.params_vs_dense < 1e-5
    assert c.flops == c.forward_flops + c.gate_flops


def test_count_gates_false_drops_only_the_gates():
    with_gates = accounting.cost("tt", 16, 8, [4, 3], 2)
    without = accounting.cost("tt", 16, 8, [4, 3], 2, count_gates=False)
    assert without.gate_params == without.gate_flops == 0
    assert without.factor_params == with_gates.factor_params
    assert without.forward_flops == with_gates.forward_flops


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: accounting.cost("svd", 4, 3, [2], 2), "kind='svd'"),
        (lambda: accounting.cost("cp", 4, 3, [2], 2, batch_size=0), "batch_size"),
        (lambda: accounting.cost("cp", 0, 3, [2], 2), "in_dim"),
        (lambda: accounting.cost("cp", 4, 3, [], 2), "expert_dims"),
        (lambda: accounting.cost("cp", 4, 3, [2], 2, bias="yes"), "bias"),
        (lambda: accounting.factorization_cost("cp"), "factorization"),
        (lambda: accounting.linear_flops(4, 3, batch_size=-1), "batch_size"),
    ],
)
def test_bad_arguments_are_named(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()
