"""The issue-19 routing references (``tests/routing_reference.py``) against hand computations and the peers.

Hand cases: 4 tokens, 3 experts, probabilities chosen so every number below is a fraction worked out
on paper (the logits are their logarithms).  Peer cases run the ``mixture-of-experts`` package's
``Top2Gating`` and ``PEER-pytorch``'s ``PK`` and ``PEER`` on the same numbers and are skipped where
those packages are not installed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import routing_reference as ref

# four tokens over three experts; each row sums to one
PROBS = np.array([[0.6, 0.3, 0.1], [0.5, 0.1, 0.4], [0.7, 0.2, 0.1], [0.2, 0.5, 0.3]])
LOGITS = np.log(PROBS)
# top-2 of each row and the weights renormalised over the two, by hand
TOP2 = [[0, 1], [0, 2], [0, 1], [1, 2]]
TOP2_WEIGHTS = [[2 / 3, 1 / 3], [5 / 9, 4 / 9], [7 / 9, 2 / 9], [5 / 8, 3 / 8]]


def test_capacity_formula_floors_caps_at_the_group_and_keeps_the_minimum():
    assert ref.capacity(1024, 16, 1.25) == 80  # the package's training capacity on its README's group
    assert ref.capacity(1024, 16, 2.0) == 128  # and in eval
    assert ref.capacity(64, 16, 1.25) == 5
    assert ref.capacity(10, 3, 1.0, min_capacity=1) == 3  # floor(3.33)
    assert ref.capacity(8, 16, 1.25) == 4  # floor(0.625) = 0, raised to the minimum of 4
    assert ref.capacity(2, 16, 2.0) == 4  # the minimum wins even over the group size
    assert ref.capacity(4, 3, 0.75, min_capacity=1) == 1
    assert ref.capacity(4, 3, 9.0, min_capacity=1) == 4  # never more than T from the factor


def test_top1_capacity_keeps_the_earliest_tokens():
    # tokens 0, 1, 2 want expert 0, token 3 expert 1; one place per expert
    probs = np.array([[0.5, 0.25, 0.25], [0.6, 0.2, 0.2], [0.8, 0.1, 0.1], [0.1, 0.7, 0.2]])
    r = ref.top_k(np.log(probs), 1, cap=1)
    assert r["indices"][:, 0].tolist() == [0, 0, 0, 1]
    assert r["kept"][:, 0].tolist() == [1, 0, 0, 1]  # position order, not gate value: token 2 has the top gate
    np.testing.assert_allclose(r["weights"][:, 0], [0.5, 0.0, 0.0, 0.7], atol=1e-12)  # k = 1: not renormalised
    assert (r["over_capacity"], r["dropped_tokens"]) == (2, 2)


def test_top2_without_capacity_renormalises_over_the_two():
    r = ref.top_k(LOGITS, 2)
    assert r["indices"].tolist() == TOP2
    np.testing.assert_allclose(r["weights"], TOP2_WEIGHTS, atol=1e-12)
    assert r["kept"].all() and (r["over_capacity"], r["dropped_tokens"]) == (0, 0)
    assert r["load"].tolist() == [3, 3, 2]  # expert 0: tokens 0-2; 1: tokens 0, 2, 3; 2: tokens 1, 3


def test_top2_capacity_places_every_first_choice_before_any_second():
    # capacity floor(1.5 * 4 / 3) = 2.  First choices: expert 0 <- tokens 0, 1 (token 2 over), expert 1 <- 3.
    # Second choices in order: 0 -> e1 (2nd place), 1 -> e2, 2 -> e1 (full), 3 -> e2 (2nd place).
    cap = ref.capacity(4, 3, 1.5, min_capacity=1)
    assert cap == 2
    r = ref.top_k(LOGITS, 2, cap=cap)
    assert r["kept"].tolist() == [[1, 1], [1, 1], [0, 0], [1, 1]]
    np.testing.assert_allclose(r["weights"], [[2 / 3, 1 / 3], [5 / 9, 4 / 9], [0, 0], [5 / 8, 3 / 8]], atol=1e-12)
    assert (r["over_capacity"], r["dropped_tokens"]) == (2, 1)
    assert r["load"].tolist() == [3, 3, 2]  # the router's choices: capacity does not change the load


@pytest.mark.parametrize(
    ("policy", "threshold", "uniform", "second_kept"),
    [
        ("all", 0.2, None, [1, 1, 1, 1]),
        ("none", 0.2, None, [0, 0, 0, 0]),
        # renormalised second weights 1/3, 4/9, 2/9, 3/8 against 0.3
        ("threshold", 0.3, None, [1, 1, 0, 1]),
        # keep when u < w2 / 0.4: 0.9 < 0.833 no; 0.5 < 1.11 yes; 0.5 < 0.556 yes; 0.95 < 0.9375 no
        ("random", 0.4, np.array([0.9, 0.5, 0.5, 0.95]), [0, 1, 1, 0]),
    ],
)
def test_second_policies_on_the_renormalised_second_weight(policy, threshold, uniform, second_kept):
    r = ref.top_k(LOGITS, 2, policy=policy, threshold=threshold, uniform=uniform)
    assert r["kept"][:, 0].tolist() == [1, 1, 1, 1]
    assert r["kept"][:, 1].tolist() == second_kept
    # the first weight stays g1 / (g1 + g2) when the second goes: no second renormalisation
    np.testing.assert_allclose(r["weights"][:, 0], [w for w, _ in TOP2_WEIGHTS], atol=1e-12)
    np.testing.assert_allclose(r["weights"][:, 1], [w * s for (_, w), s in zip(TOP2_WEIGHTS, second_kept)],
                               atol=1e-12)
    assert r["over_capacity"] == 0 and r["dropped_tokens"] == 0


def test_a_slot_the_policy_removes_takes_no_place():
    # threshold 0.3 removes token 2's second slot; one place per expert.
    # First: e0 <- token 0 (1, 2 over), e1 <- token 3.  Second: 0 -> e1 full; 1 -> e2 free; 3 -> e2 full.
    r = ref.top_k(LOGITS, 2, policy="threshold", threshold=0.3, cap=1)
    assert r["kept"].tolist() == [[1, 0], [0, 1], [0, 0], [1, 0]]
    np.testing.assert_allclose(r["weights"], [[2 / 3, 0], [0, 4 / 9], [0, 0], [5 / 8, 0]], atol=1e-12)
    assert (r["over_capacity"], r["dropped_tokens"]) == (4, 1)  # token 2's second slot: the policy's, not counted


def test_padding_takes_no_place_and_counts_nowhere():
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.2, 0.2], [0.7, 0.2, 0.1]])
    r = ref.top_k(np.log(probs), 1, cap=1, valid=np.array([False, True, True]))
    assert r["kept"][:, 0].tolist() == [0, 1, 0]  # token 1 gets the place padding token 0 would have taken
    assert (r["over_capacity"], r["dropped_tokens"]) == (1, 1)
    assert r["load"].tolist() == [2, 0, 0]


def test_ties_go_to_the_lower_expert():
    r = ref.top_k(np.zeros((1, 4)), 2)
    assert r["indices"].tolist() == [[0, 1]]
    np.testing.assert_allclose(r["weights"], [[0.5, 0.5]])


def test_sorted_capacity_equals_the_loop():
    rng = np.random.default_rng(3)
    for _ in range(200):
        tokens, experts = int(rng.integers(1, 12)), int(rng.integers(2, 6))
        k = int(rng.integers(1, 3))
        policy = "threshold" if k == 2 and rng.random() < 0.5 else "all"
        valid = rng.random(tokens) < 0.8
        cap = int(rng.integers(0, tokens + 1))
        logits = rng.normal(size=(tokens, experts))
        loop = ref.top_k(logits, k, policy=policy, threshold=0.3, cap=cap, valid=valid)
        free = ref.top_k(logits, k, policy=policy, threshold=0.3, valid=valid)  # asked: policy and padding only
        got = ref.capacity_keep_sorted(free["indices"], free["kept"] > 0, cap, experts)
        assert got.tolist() == (loop["kept"] > 0).tolist()


def test_combine_zero_and_pass_through():
    routing = ref.top_k(LOGITS, 2, cap=2)  # token 2 dropped altogether (see above)
    # expert e gives token t the output [t + 1, 10 e]
    outputs = np.array([[[t + 1.0, 10.0 * e] for e in range(3)] for t in range(4)])
    x = np.array([[-1.0, -2.0], [-3.0, -4.0], [-5.0, -6.0], [-7.0, -8.0]])
    want = np.array([
        [1.0, 10 / 3],            # 2/3 [1, 0] + 1/3 [1, 10]
        [2.0, 80 / 9],            # 5/9 [2, 0] + 4/9 [2, 20]
        [0.0, 0.0],               # dropped
        [4.0, 50 / 8 + 60 / 8],   # 5/8 [4, 10] + 3/8 [4, 20]
    ])
    np.testing.assert_allclose(ref.combine(routing, outputs, x, "zero"), want, atol=1e-12)
    want[2] = x[2]
    np.testing.assert_allclose(ref.combine(routing, outputs, x, "pass-through"), want, atol=1e-12)
    # a token that keeps one of its two slots is not passed through: token 1 keeps only its second
    partial = ref.top_k(LOGITS, 2, policy="threshold", threshold=0.3, cap=1)
    y = ref.combine(partial, outputs, x, "pass-through")
    np.testing.assert_allclose(y[1], [4 / 9 * 2, 4 / 9 * 20], atol=1e-12)
    np.testing.assert_allclose(y[2], x[2])


def test_pass_through_needs_as_many_outputs_as_inputs():
    routing = ref.top_k(LOGITS, 1)
    with pytest.raises(ValueError, match="in_dim == out_dim"):
        ref.combine(routing, np.zeros((4, 3, 5)), np.zeros((4, 2)), "pass-through")


def test_the_mixture_of_experts_package_routes_the_same():
    torch = pytest.importorskip("torch")
    moe = pytest.importorskip("mixture_of_experts.mixture_of_experts")
    rng = np.random.default_rng(0)
    tokens, experts = 48, 4
    # not "threshold": mixture-of-experts 0.2.3 multiplies mask_2 [b, T, N] by (gate_2 > threshold) [b, T]
    # without a trailing axis, which fails unless T == N (and then compares the wrong axis); its random
    # branch, tested here, has the axis, and the hand cases above pin the threshold policy down
    for trial, (policy, threshold) in enumerate([("all", 0.2), ("none", 0.2), ("random", 0.2), ("random", 0.35)]):
        for training, factor in ((True, 1.25), (False, 2.0)):
            # skewed logits: expert 0 is popular, so capacity binds
            logits = rng.normal(size=(tokens, experts)) * 1.5 + np.array([1.5, 0.5, 0.0, -0.5])
            gate = moe.Top2Gating(experts, experts, second_policy_train=policy, second_policy_eval=policy,
                                  second_threshold_train=threshold, second_threshold_eval=threshold,
                                  capacity_factor_train=factor, capacity_factor_eval=factor).double()
            with torch.no_grad():
                gate.w_gating.copy_(torch.eye(experts, dtype=torch.float64))  # raw gates = softmax(x)
            gate.train(training)
            seed = 100 + trial
            torch.manual_seed(seed)
            uniform = torch.zeros(1, tokens, dtype=torch.float64).uniform_(0.0, 1.0)[0].numpy()
            torch.manual_seed(seed)
            with torch.no_grad():
                _, combine_tensor, _ = gate(torch.from_numpy(logits)[None])
            theirs = combine_tensor.sum(-1)[0].numpy()  # [T, N]
            cap = ref.capacity(tokens, experts, factor)
            r = ref.top_k(logits, 2, policy=policy, threshold=threshold, uniform=uniform, cap=cap)
            ours = np.zeros((tokens, experts))
            for t in range(tokens):
                for j in range(2):
                    ours[t, r["indices"][t, j]] += r["weights"][t, j]
            np.testing.assert_allclose(ours, theirs, atol=1e-8, err_msg=f"{policy}, training={training}")
            if training and policy == "all":
                assert r["over_capacity"] > 0  # the case exercises capacity


# -- product keys --------------------------------------------------------------------------------------

def _hand_router(s0, s1):
    """x = [1], one head, d_k = 1: the sub-key scores are the keys themselves."""
    one = np.ones((1, 1))
    return {"x": one, "query0": one, "query1": one, "keys0": np.array(s0, float).reshape(1, -1, 1),
            "keys1": np.array(s1, float).reshape(1, -1, 1)}


def test_product_key_joint_top_k_by_hand():
    # s0 = [1, 3], s1 = [2, 0]: e = 2i + j scores e0 = 3, e1 = 1, e2 = 5, e3 = 3
    case = _hand_router([1, 3], [2, 0])
    for select in (ref.product_key_brute_force, ref.product_key_candidates):
        r = select(**case, k=2)
        assert r["experts"].tolist() == [[2, 0]]  # 5, then the tie 3 = 3 goes to the lower expert
        assert (r["level0"].tolist(), r["level1"].tolist()) == ([[1, 0]], [[0, 0]])
        np.testing.assert_allclose(r["scores"], [[5.0, 3.0]])
        np.testing.assert_allclose(r["weights"], [[1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2))]], atol=1e-12)
    relu = ref.product_key_brute_force(**_hand_router([-1, 1], [-3, 0]), k=2, score="relu")
    assert relu["experts"].tolist() == [[3, 1]]  # scores 1, -1 (e1 = -1 + 0 beats e2 = 1 - 3 = -2)
    np.testing.assert_allclose(relu["weights"], [[1.0, 0.0]])


def test_candidates_in_rank_order_would_break_the_tie_rule():
    # the same case: ranking the halves by score (i = [1, 0], j = [0, 1]) and flattening picks e3 before e0
    s0, s1 = np.array([1.0, 3.0]), np.array([2.0, 0.0])
    i, j = np.argsort(-s0, kind="stable"), np.argsort(-s1, kind="stable")
    sums = (s0[i][:, None] + s1[j][None, :]).ravel()
    pick = np.argsort(-sums, kind="stable")[:2]
    assert [int(i[p // 2] * 2 + j[p % 2]) for p in pick] == [2, 3]  # not the full sort's [2, 0]


def test_joint_selection_is_not_per_level_top_k():
    # per-level top-2 (the current two-level top-k) takes both sub-keys of each level: all four pairs
    r = ref.product_key_brute_force(**_hand_router([1, 3], [2, 0]), k=2)
    per_level = {2 * i + j for i in (1, 0) for j in (0, 1)}  # top-2 of s0 = [1, 3] x top-2 of s1 = [2, 0]
    assert len(per_level) == 4
    assert set(r["experts"][0].tolist()) == {2, 0} < per_level


@pytest.mark.parametrize("integer_scores", [False, True])
def test_candidates_equal_the_full_sort(integer_scores):
    rng = np.random.default_rng(1 if integer_scores else 2)
    for _ in range(60):
        n, heads, dk, d = int(rng.integers(1, 7)), int(rng.integers(1, 4)), int(rng.integers(1, 4)), 3
        k = int(rng.integers(1, n * n + 1)) if n > 1 else 1
        k = min(k, n)  # the candidates need k <= k' <= n
        k_half = int(rng.integers(k, n + 1))
        draw = (lambda *s: rng.integers(-2, 3, size=s).astype(float)) if integer_scores else (lambda *s: rng.normal(size=s))
        case = {"x": draw(4, d), "query0": draw(d, heads * dk), "query1": draw(d, heads * dk),
                "keys0": draw(heads, n, dk), "keys1": draw(heads, n, dk)}
        want = ref.product_key_brute_force(**case, k=k)
        got = ref.product_key_candidates(**case, k=k, k_half=k_half)
        for name in ("experts", "level0", "level1"):
            assert got[name].tolist() == want[name].tolist()
        np.testing.assert_allclose(got["scores"], want["scores"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(got["weights"], want["weights"], rtol=0, atol=1e-12)


def test_product_keys_match_peer_pytorch_pk():
    torch = pytest.importorskip("torch")
    pk_module = pytest.importorskip("PEER_pytorch.PK")
    torch.manual_seed(0)
    dim, heads, dk, n, k = 6, 2, 3, 5, 4
    pk = pk_module.PK(dim, heads=heads, dim_key=dk, num_keys=n, product_keys=2, product_key_topk=k,
                      final_topk=k).double()
    with torch.no_grad():
        pk.keys.normal_()
    x = torch.randn(1, 7, dim, dtype=torch.float64)
    with torch.no_grad():
        scores, indices = pk(x, softmax_scores=True)  # [1, 7, h, k]
    w = pk.to_queries[0].weight.detach().numpy()  # [(p h d), dim]
    keys = pk.keys.detach().numpy()  # [p, n, h, d]
    # PK's index is i_0 + n * i_1: its second half is our level 0 (the major index)
    case = {"x": x[0].numpy(), "query0": w[heads * dk:].T, "query1": w[:heads * dk].T,
            "keys0": keys[1].transpose(1, 0, 2), "keys1": keys[0].transpose(1, 0, 2)}
    want = ref.product_key_brute_force(**case, k=k)
    assert indices[0].reshape(7, heads * k).tolist() == want["experts"].tolist()
    np.testing.assert_allclose(scores[0].reshape(7, heads * k).numpy(), want["weights"], atol=1e-12)


@pytest.mark.parametrize("non_competing", [False, True])
def test_product_keys_match_peer_pytorch_output(non_competing):
    torch = pytest.importorskip("torch")
    peer_module = pytest.importorskip("PEER_pytorch")
    torch.manual_seed(1)
    dim, heads, dk, n, k = 8, 2, 4, 4, 3
    peer = peer_module.PEER(dim=dim, heads=heads, num_experts=n * n, num_experts_per_head=k, product_key_topk=k,
                            dim_key=dk, non_competing_scores=non_competing).double()
    with torch.no_grad():
        peer.keys.normal_()
    x = torch.randn(1, 5, dim, dtype=torch.float64)
    with torch.no_grad():
        y = peer(x)[0].numpy()
    w = peer.to_queries[0].weight.detach().numpy()  # [(p h d), dim]: PEER's first half is our level 0
    keys = peer.keys.detach().numpy()  # [h, n, p, d]
    case = {"x": x[0].numpy(), "query0": w[:heads * dk].T, "query1": w[heads * dk:].T,
            "keys0": keys[:, :, 0], "keys1": keys[:, :, 1]}
    # PEER keeps one expert per head with a ReLU weight when its scores do not compete
    r = ref.product_key_brute_force(**case, k=1 if non_competing else k, score="relu" if non_competing else "softmax")
    down = peer.weight_down_embed.weight.detach().numpy()
    up = peer.weight_up_embed.weight.detach().numpy()
    xs = x[0].numpy()
    want = np.zeros_like(xs)
    for b in range(len(xs)):
        for m, e in enumerate(r["experts"][b]):
            hidden = float(xs[b] @ down[e])
            gelu = 0.5 * hidden * (1 + math.erf(hidden / math.sqrt(2)))  # nn.GELU's exact form
            want[b] += r["weights"][b, m] * gelu * up[e]
    np.testing.assert_allclose(y, want, atol=1e-10)


def test_paired_output_by_hand():
    weight = np.array([[1.0, 2.0], [11.0, 12.0]]).reshape(2, 2, 1, 1)  # W[i, j] = 10 i + j + 1
    y = ref.paired_output(weight, np.array([[2.0]]), np.array([[1, 0]]), np.array([[0, 1]]), np.array([[0.75, 0.25]]))
    assert y.tolist() == [[2 * (0.75 * 11 + 0.25 * 2)]]  # 17.5: pairs (1, 0) and (0, 1), not the four cross pairs
