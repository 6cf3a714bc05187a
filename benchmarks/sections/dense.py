"""Section 3: planned CP against the dense reference through ``W`` at growing expert counts (``W`` under a cap)."""

from __future__ import annotations

from cases import make_case
from harness import Backend, ratio, time_side_by_side, verify


def section_dense(be: Backend, cfg: dict, out: dict) -> None:
    batch = cfg["linear_batch"]
    for n in cfg["dense_ns"]:
        layer, pn, xn = make_case("cp", cfg["I"], cfg["O"], [n], cfg["ranks"]["cp"], batch)
        w_bytes = layer.n_dense_params * 4
        row = {"backend": be.label, "experts": n, "batch": batch, "dense_w_bytes": w_bytes}
        if w_bytes > cfg["dense_cap"]:
            row.update(skipped=f"dense W {w_bytes / 2**30:.2f} GiB > cap {cfg['dense_cap'] / 2**30:.2f} GiB")
            out["dense"].append(row)
            continue
        p, x = be.params(pn), be.array(xn)
        verify(f"{be.label} dense N={n}", be.numpy(layer.dense_forward(p, x)), be.numpy(layer.apply(p, x)))
        t = time_side_by_side({"planned": lambda: layer.apply(p, x), "dense": lambda: layer.dense_forward(p, x)},
                              be, cfg["dense_repeats"], cfg["row_budget_s"])
        row.update(planned=t["planned"], dense=t["dense"], ratio=ratio(t["dense"], t["planned"]))
        out["dense"].append(row)
