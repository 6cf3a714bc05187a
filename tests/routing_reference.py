"""Brute-force float64 NumPy references for the routing features of issue 19 (``/work/notes/19-spec.md``).

Written from the spec, not from tensormoe's code, and as plainly as possible: capacity is an explicit
loop over slots and tokens, the product-key joint top-k is a full sort of all ``N = n * n`` summed
scores.  Everything here works on one group of ``T`` tokens (a capacity group; the product-key router
treats every token alone) and takes logits or queries directly, so tests can hand it numbers written
on paper.

* :func:`capacity` -- tokens per expert per group.
* :func:`top_k` -- token-choice top-k with renormalisation, the second-expert policy (``k = 2``),
  capacity in position order with every token's first choice placed before any second choice, and
  the dropped-token counts.
* :func:`capacity_keep_sorted` -- the same capacity as a stable sort (the jit-friendly form the spec
  proposes), for comparison with the loop;
* :func:`combine` -- a layer's output from per-expert outputs and a top-k routing, ``zero`` or
  ``pass-through`` for the tokens no expert processes.
* :func:`product_key_brute_force` -- PEER's product-key retrieval as a joint top-k over all ``N``
  summed sub-key scores, by a full sort; :func:`product_key_candidates` -- the same selection from the
  ``k' x k'`` candidates, written as the spec says the router must do it (tie rule included).
* :func:`paired_output` -- the output of a layer whose two expert levels are selected jointly (pairs
  of indices), by a loop over the selected pairs of a dense weight ``W[n, n, I, O]``.
"""

from __future__ import annotations

import math

import numpy as np

POLICIES = ("all", "none", "threshold", "random")
#: added to the threshold in the random policy's division, as the mixture-of-experts package does
POLICY_EPS = 1e-9


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def capacity(tokens: int, experts: int, factor: float, min_capacity: int = 4) -> int:
    """``max(min_capacity, min(T, floor(T * factor / N)))``: slots of each expert in a group of ``T`` tokens."""
    return max(min_capacity, min(tokens, math.floor((tokens * factor) / experts)))


def top_k(
    logits: np.ndarray,
    k: int,
    *,
    renormalize: bool | None = None,
    policy: str = "all",
    threshold: float = 0.2,
    uniform: np.ndarray | None = None,
    cap: int | None = None,
    valid: np.ndarray | None = None,
) -> dict[str, np.ndarray | int]:
    """Top-k routing of one group ``logits[T, N]``, by loops.

    1. probabilities ``softmax(logits)``; each token's ``k`` largest (ties: the lower expert index);
       weights their probabilities, divided by their sum when ``renormalize`` (default ``k > 1``);
    2. ``k = 2`` only: the second-expert ``policy`` keeps or removes each token's second slot, comparing
       the (renormalised) second weight ``w2``: ``all`` keeps, ``none`` removes, ``threshold`` keeps when
       ``w2 > threshold``, ``random`` keeps when ``uniform[t] < w2 / max(threshold, POLICY_EPS)``;
    3. with a capacity ``cap``: slot by slot (every token's first choice, then every second choice,
       ...), tokens in position order; a valid token's slot that the policy kept takes a place of its
       expert if one of the ``cap`` is left, otherwise it is dropped;
    4. weights of removed or dropped slots become 0; the others are not renormalised again; padding
       tokens (``valid`` false) keep their indices, get zero weights, take no place and count nowhere.

    Returns ``weights``, ``indices`` (``[T, k]``), ``kept`` (``[T, k]`` of 0/1: the slot is used),
    ``over_capacity`` (slots kept by the policy but dropped for capacity), ``dropped_tokens`` (valid
    tokens with no slot used), ``load`` (``[N]``: counts of the ``k`` selected indices of valid tokens,
    before policy and capacity).
    """
    logits = np.asarray(logits, np.float64)
    n_tokens, n_experts = logits.shape
    if not 1 <= k <= n_experts:
        raise ValueError(f"k={k} outside [1, {n_experts}]")
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r}")
    if policy != "all" and k != 2:
        raise ValueError("a second-expert policy needs k = 2")
    renormalize = k > 1 if renormalize is None else renormalize
    valid = np.ones(n_tokens, bool) if valid is None else np.asarray(valid, bool)
    probs = softmax(logits)
    indices = np.zeros((n_tokens, k), np.int64)
    weights = np.zeros((n_tokens, k))
    for t in range(n_tokens):
        order = sorted(range(n_experts), key=lambda e: (-logits[t, e], e))
        indices[t] = order[:k]
        weights[t] = probs[t, order[:k]]
        if renormalize:
            weights[t] = weights[t] / weights[t].sum()
    asked = np.ones((n_tokens, k), bool)  # the slot survives the second-expert policy
    for t in range(n_tokens):
        if policy == "none":
            asked[t, 1] = False
        elif policy == "threshold":
            asked[t, 1] = weights[t, 1] > threshold
        elif policy == "random":
            if uniform is None:
                raise ValueError("the random policy needs uniform draws")
            asked[t, 1] = uniform[t] < weights[t, 1] / max(threshold, POLICY_EPS)
    kept = asked & valid[:, None]
    over = 0
    if cap is not None:
        used = [0] * n_experts
        for slot in range(k):
            for t in range(n_tokens):
                if not kept[t, slot]:
                    continue
                e = indices[t, slot]
                if used[e] < cap:
                    used[e] += 1
                else:
                    kept[t, slot] = False
                    over += 1
    load = np.zeros(n_experts)
    for t in range(n_tokens):
        if valid[t]:
            for e in indices[t]:
                load[e] += 1
    return {
        "weights": np.where(kept, weights, 0.0),
        "indices": indices,
        "kept": kept.astype(np.float64),
        "over_capacity": over,
        "dropped_tokens": int(sum(1 for t in range(n_tokens) if valid[t] and not kept[t].any())),
        "load": load,
    }


def capacity_keep_sorted(indices: np.ndarray, asked: np.ndarray, cap: int, n_experts: int) -> np.ndarray:
    """The spec's vectorised capacity (no loop over tokens): which asked slots ``[T, k]`` get a place.

    Slots laid out slot-major, keyed by their expert (``n_experts`` for a slot not asked for), stably
    sorted; a slot's place is its rank minus the start of its expert's run.  Equals the loop in
    :func:`top_k`.
    """
    keys = np.where(asked, indices, n_experts).T.ravel()  # slot-major: every slot 0, then every slot 1, ...
    order = np.argsort(keys, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(keys, minlength=n_experts + 1))[:-1]])
    place = np.empty_like(order)
    place[order] = np.arange(len(order)) - starts[keys[order]]
    kept = (keys < n_experts) & (place < cap)
    return kept.reshape(indices.shape[1], indices.shape[0]).T


def combine(
    routing: dict, expert_outputs: np.ndarray, x: np.ndarray, overflow: str = "zero"
) -> np.ndarray:
    """``y[t] = sum_j weights[t, j] * expert_outputs[t, indices[t, j]]`` over the used slots.

    ``expert_outputs[T, N, O]`` is what every expert would give every token.  A token with no used slot
    gets 0 (``overflow="zero"``) or its input ``x[t]`` (``"pass-through"``, needs ``I == O``); a token
    that keeps one of two slots gets that slot's weighted output only, in both modes.
    """
    if overflow not in ("zero", "pass-through"):
        raise ValueError(f"overflow={overflow!r}")
    n_tokens, _, out_dim = expert_outputs.shape
    if overflow == "pass-through" and x.shape[-1] != out_dim:
        raise ValueError("pass-through needs in_dim == out_dim")
    y = np.zeros((n_tokens, out_dim))
    for t in range(n_tokens):
        for j in range(routing["indices"].shape[1]):
            if routing["kept"][t, j]:
                y[t] += routing["weights"][t, j] * expert_outputs[t, routing["indices"][t, j]]
        if overflow == "pass-through" and not routing["kept"][t].any():
            y[t] = x[t]
    return y


# -- product keys --------------------------------------------------------------------------------------

def sub_scores(x: np.ndarray, query: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``s[b, head, i] = (x @ query)[b, head * d_k : (head + 1) * d_k] . keys[head, i]``, ``[B, h, n]``."""
    heads, _, dk = keys.shape
    q = (np.asarray(x, np.float64) @ np.asarray(query, np.float64)).reshape(len(x), heads, dk)
    return np.einsum("bhd,hnd->bhn", q, np.asarray(keys, np.float64))


def _weights(scores: np.ndarray, score: str) -> np.ndarray:
    if score == "softmax":
        return softmax(scores)
    if score == "relu":
        return np.maximum(scores, 0.0)
    raise ValueError(f"score={score!r}")


def product_key_brute_force(
    x: np.ndarray, query0: np.ndarray, query1: np.ndarray, keys0: np.ndarray, keys1: np.ndarray, k: int,
    score: str = "softmax",
) -> dict[str, np.ndarray]:
    """Joint top-k over all ``N = n * n`` experts ``e = i * n + j`` by summed score ``s0[i] + s1[j]``.

    Per token and head: every ``(i, j)`` scored, sorted by (score descending, ``e`` ascending), the first
    ``k`` kept; their weights ``softmax`` over the ``k`` scores (or ``relu`` of each).  Heads are
    concatenated head-major: slot ``m = head * k + r``.  Returns ``level0`` (``i``), ``level1`` (``j``),
    ``experts`` (``e``), ``scores`` and ``weights``, each ``[B, h * k]``.
    """
    s0, s1 = sub_scores(x, query0, keys0), sub_scores(x, query1, keys1)
    batch, heads, n = s0.shape
    out = {name: np.zeros((batch, heads * k), dtype) for name, dtype in
           (("level0", np.int64), ("level1", np.int64), ("experts", np.int64), ("scores", float), ("weights", float))}
    for b in range(batch):
        for h in range(heads):
            total = [(s0[b, h, i] + s1[b, h, j], i * n + j) for i in range(n) for j in range(n)]
            total.sort(key=lambda pair: (-pair[0], pair[1]))
            best = total[:k]
            sl = slice(h * k, (h + 1) * k)
            out["scores"][b, sl] = [s for s, _ in best]
            out["experts"][b, sl] = [e for _, e in best]
            out["weights"][b, sl] = _weights(np.array([s for s, _ in best]), score)
    out["level0"], out["level1"] = out["experts"] // n, out["experts"] % n
    return out


def product_key_candidates(
    x: np.ndarray, query0: np.ndarray, query1: np.ndarray, keys0: np.ndarray, keys1: np.ndarray, k: int,
    k_half: int | None = None, score: str = "softmax",
) -> dict[str, np.ndarray]:
    """The spec's algorithm: top-``k'`` per half, the ``k' x k'`` candidate sums, their top-k.

    Each half's ``k'`` best sub-keys (ties: lower index) are put back in index order before the sums,
    so the flattened candidates run in expert order ``e = i * n + j`` and a stable top-k gives ties to
    the lower ``e``, as the full sort does.  Same output as :func:`product_key_brute_force`.
    """
    s0, s1 = sub_scores(x, query0, keys0), sub_scores(x, query1, keys1)
    batch, heads, n = s0.shape
    k_half = k if k_half is None else k_half
    if not k <= k_half <= n:
        raise ValueError(f"need k <= k_half <= n; got k={k}, k_half={k_half}, n={n}")

    def best(s: np.ndarray) -> np.ndarray:
        order = np.argsort(-s, axis=-1, kind="stable")[..., :k_half]
        return np.sort(order, axis=-1)  # back in index order

    i, j = best(s0), best(s1)  # [B, h, k']
    c0, c1 = np.take_along_axis(s0, i, -1), np.take_along_axis(s1, j, -1)
    sums = (c0[..., :, None] + c1[..., None, :]).reshape(batch, heads, k_half * k_half)
    pick = np.argsort(-sums, axis=-1, kind="stable")[..., :k]
    level0 = np.take_along_axis(i, pick // k_half, -1)
    level1 = np.take_along_axis(j, pick % k_half, -1)
    scores = np.take_along_axis(sums, pick, -1)
    weights = np.stack([_weights(scores[:, h], score) for h in range(heads)], axis=1)
    out = {"level0": level0, "level1": level1, "experts": level0 * n + level1, "scores": scores, "weights": weights}
    return {name: value.reshape(batch, heads * k) for name, value in out.items()}


def paired_output(weight: np.ndarray, x: np.ndarray, level0: np.ndarray, level1: np.ndarray,
                  weights: np.ndarray) -> np.ndarray:
    """``y[b] = sum_m weights[b, m] * x[b] @ W[level0[b, m], level1[b, m]]`` for ``W[n0, n1, I, O]``.

    Pairs selected twice (two heads) add up; a bias row, if any, is the caller's (pass ``[x, 1]`` and
    ``W[..., I + 1, O]``).
    """
    y = np.zeros((len(x), weight.shape[-1]))
    for b in range(len(x)):
        for m in range(level0.shape[1]):
            y[b] += weights[b, m] * (np.asarray(x[b], np.float64) @ weight[level0[b, m], level1[b, m]])
    return y
