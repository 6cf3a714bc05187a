"""Plots of expert specialisation (matplotlib, the ``examples`` extra).

Each function draws one figure from the results of :mod:`tensormoe.tools.analysis`
and returns it (a ``matplotlib.figure.Figure``, made without pyplot, so no
window opens and nothing needs closing); ``path=`` also saves it.  matplotlib
is imported when a function is called, not with this module.

* :func:`class_heatmap` -- experts by classes: how each expert's coefficient
  mass splits over the classes;
* :func:`top_experts` -- for each class, its ``k`` most associated experts;
* :func:`ablation_curve` -- accuracy on the target class and on the others as
  experts are removed;
* :func:`usage_histogram` -- how evenly the experts are used.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .analysis import AblationCurve, ExpertUsage

__all__ = ["ablation_curve", "class_heatmap", "top_experts", "usage_histogram"]


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("tensormoe.tools.plots needs matplotlib: pip install 'tensormoe[examples]'") from error
    return Figure(figsize=(width, height), layout="constrained")


def _finish(fig: Any, path: str | os.PathLike | None) -> Any:
    if path is not None:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


def _class_names(classes: Sequence[str] | None, n: int) -> list[str]:
    if classes is None:
        return [str(c) for c in range(n)]
    if len(classes) != n:
        raise ValueError(f"classes must name all {n} classes; got {len(classes)} names")
    return [str(c) for c in classes]


def _shown_classes(usage: ExpertUsage, max_classes: int | None) -> np.ndarray:
    """The classes to show: all, or the ``max_classes`` with the most rows (in class order)."""
    order = np.argsort(-usage.class_rows, kind="stable")
    keep = order if max_classes is None else order[:max_classes]
    return np.sort(keep[usage.class_rows[keep] > 0])


def class_heatmap(
    usage: ExpertUsage,
    *,
    level: int | None = 0,
    classes: Sequence[str] | None = None,
    balanced: bool = True,
    max_classes: int | None = None,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Any:
    """Heat map of :meth:`ExpertUsage.class_distribution`: experts (columns) by classes (rows).

    Experts are grouped by their top class (strongest first); unused ones come
    last, their indices in parentheses.

    Parameters
    ----------
    usage : ExpertUsage
    level : int or None
        Level (``None``: expert tuples).
    classes : sequence of str, optional
        Names of all the classes (default: their indices).
    balanced : bool
        Split each expert's mean coefficient per class (default) or its raw mass.
    max_classes : int, optional
        Show only the classes with the most rows (shares stay those over all classes).
    title : str, optional
    path : str, optional
        Also save the figure there (PNG, 120 dpi).

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np
    >>> from tensormoe.tools.analysis import expert_usage
    >>> usage = expert_usage(np.array([[1.0, 0.0], [0.2, 0.8]]), np.array([0, 1]))
    >>> fig = class_heatmap(usage, classes=["a", "b"])
    >>> fig.axes[0].get_ylabel()
    'class'
    """
    dist = usage.class_distribution(level, balanced=balanced)  # [N, C]
    names = _class_names(classes, usage.n_classes)
    shown = _shown_classes(usage, max_classes)
    used = usage.used(level) & ~np.isnan(dist).any(1)
    filled = np.nan_to_num(dist, nan=0.0)
    order = np.lexsort((-filled.max(1), np.where(used, filled.argmax(1), usage.n_classes), ~used))
    n = len(order)
    fig = _figure(max(6.0, 0.14 * n + 2.5), max(3.0, 0.22 * len(shown) + 1.5))
    ax = fig.add_subplot()
    image = ax.imshow(filled[order][:, shown].T, aspect="auto", cmap="viridis", vmin=0, vmax=1,
                      interpolation="nearest")
    step = max(1, n // 64)
    ticks = list(range(0, n, step))
    ax.set_xticks(ticks, [str(order[t]) if used[order[t]] else f"({order[t]})" for t in ticks], fontsize=6,
                  rotation=90)
    ax.set_yticks(range(len(shown)), [names[c] for c in shown], fontsize=7)
    what = "expert tuple (flat index)" if level is None and len(usage.expert_dims) > 1 else "expert"
    ax.set_xlabel(f"{what}, grouped by top class ({int((~used).sum())} unused, in parentheses)")
    ax.set_ylabel("class")
    ax.set_title(title or "Share of each expert's coefficient mass per class", fontsize=10)
    kind = "mean coefficient per class" if balanced else "coefficient mass"
    fig.colorbar(image, ax=ax, label=f"share of the expert's {kind}")
    return _finish(fig, path)


def top_experts(
    usage: ExpertUsage,
    *,
    k: int = 3,
    level: int | None = 0,
    classes: Sequence[str] | None = None,
    by: str = "selectivity",
    max_classes: int | None = None,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Any:
    """For each class (rows), its ``k`` most associated experts (columns, best first), annotated with their index.

    The colour is the class's mean coefficient of that expert
    (:meth:`ExpertUsage.class_mean`); the ranking is ``by`` (see
    :meth:`ExpertUsage.top_experts`).

    Examples
    --------
    >>> import numpy as np
    >>> from tensormoe.tools.analysis import expert_usage
    >>> usage = expert_usage(np.array([[1.0, 0.0, 0.0], [0.0, 0.3, 0.7]]), np.array([0, 1]))
    >>> fig = top_experts(usage, k=2)
    >>> fig.axes[0].get_xlabel()
    'rank of the expert for the class'
    """
    names = _class_names(classes, usage.n_classes)
    shown = _shown_classes(usage, max_classes)
    mean = usage.class_mean(level)
    picks = np.stack([usage.top_experts(int(c), k, level, by=by) for c in shown])
    values = np.stack([mean[c, p] for c, p in zip(shown, picks)])
    fig = _figure(1.1 * k + 3.0, max(2.5, 0.3 * len(shown) + 1.2))
    ax = fig.add_subplot()
    image = ax.imshow(values, aspect="auto", cmap="magma", vmin=0, vmax=max(float(np.nanmax(values)), 1e-12),
                      interpolation="nearest")
    flat = level is None and len(usage.expert_dims) > 1
    for i in range(len(shown)):
        for j in range(k):
            label = str(usage.expert_index(picks[i, j])) if flat else str(picks[i, j])
            light = values[i, j] < 0.5 * np.nanmax(values)
            ax.text(j, i, label, ha="center", va="center", fontsize=7, color="white" if light else "black")
    ax.set_xticks(range(k), [str(j + 1) for j in range(k)])
    ax.set_yticks(range(len(shown)), [names[c] for c in shown], fontsize=7)
    ax.set_xlabel("rank of the expert for the class")
    ax.set_ylabel("class")
    ax.set_title(title or f"Top {k} experts per class (by {by}; numbers: expert index)", fontsize=10)
    fig.colorbar(image, ax=ax, label="mean coefficient on the class")
    return _finish(fig, path)


def ablation_curve(
    curves: AblationCurve | Sequence[AblationCurve],
    *,
    labels: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Any:
    """Accuracy on the target class (solid) and on the other classes (dashed) as experts are removed.

    One panel per target class; within a panel one colour per curve label
    (e.g. per model or per intervention mode), the same colour in every panel.

    Parameters
    ----------
    curves : AblationCurve or sequence of them
    labels : sequence of str, optional
        Legend names of the curves (curves of one label in several panels share it).
    classes : sequence of str, optional
        Names of all the classes, for the panel titles.

    Examples
    --------
    >>> import numpy as np
    >>> from tensormoe.tools.analysis import AblationCurve
    >>> curve = AblationCurve((3, 1), np.array([0, 1, 2]), np.array([[0.9, 0.8], [0.5, 0.8], [0.1, 0.7]]), 0)
    >>> fig = ablation_curve(curve, classes=["e", "t"])
    >>> fig.axes[0].get_ylabel(), fig.axes[0].get_title()
    ('accuracy (%)', 'target class e')
    """
    curves = [curves] if isinstance(curves, AblationCurve) else list(curves)
    if not curves:
        raise ValueError("curves must hold at least one AblationCurve")
    if labels is not None and len(labels) != len(curves):
        raise ValueError(f"labels must name all {len(curves)} curves; got {len(labels)}")
    labels = list(labels) if labels is not None else [f"curve {i}" for i in range(len(curves))]
    targets = list(dict.fromkeys(c.target for c in curves))
    colours = {name: f"C{i}" for i, name in enumerate(dict.fromkeys(labels))}
    fig = _figure(4.2 * len(targets) + 0.8, 4.6)
    axes = fig.subplots(1, len(targets), squeeze=False, sharey=True)[0]
    for ax, target in zip(axes, targets):
        for curve, name in zip(curves, labels):
            if curve.target != target:
                continue
            ax.plot(curve.removed, 100 * curve.target_accuracy, "-o", color=colours[name], markersize=3,
                    label=f"{name}: target")
            ax.plot(curve.removed, 100 * curve.other_accuracy, "--", color=colours[name],
                    label=f"{name}: other classes")
        name = str(classes[target]) if classes is not None and target < len(classes) else str(target)
        ax.set_title(f"target class {name}", fontsize=9)
        ax.set_xlabel("experts removed (most selective first)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=min(4, max(1, len(names) // 2)), fontsize=7)
    fig.suptitle(title or "Counterfactual ablation", fontsize=10)
    return _finish(fig, path)


def usage_histogram(
    usage: ExpertUsage | Sequence[ExpertUsage],
    *,
    level: int | None = 0,
    labels: Sequence[str] | None = None,
    bins: int = 30,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Any:
    """Histogram of the experts' loads relative to uniform (mean coefficient times the number of experts).

    ``1`` is an expert used exactly as much as under uniform routing.  The axis
    is logarithmic; experts never used (load 0) are counted in the legend.
    Several usages (e.g. one per model) are overlaid.

    Examples
    --------
    >>> import numpy as np
    >>> from tensormoe.tools.analysis import expert_usage
    >>> fig = usage_histogram(expert_usage(np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])))
    >>> fig.axes[0].get_xlabel()
    'load relative to uniform (mean coefficient x number of experts)'
    """
    usages = [usage] if isinstance(usage, ExpertUsage) else list(usage)
    if labels is not None and len(labels) != len(usages):
        raise ValueError(f"labels must name all {len(usages)} usages; got {len(labels)}")
    loads = [u.mean_coefficient(level) * u.n_experts(level) for u in usages]
    positive = np.concatenate([v[v > 0] for v in loads]) if loads else np.zeros(0)
    low = min(float(positive.min()), 0.5) if positive.size else 0.5
    high = max(float(positive.max()), 2.0) if positive.size else 2.0
    edges = np.geomspace(low * 0.999, high * 1.001, bins + 1)
    fig = _figure(6.0, 3.8)
    ax = fig.add_subplot()
    for i, v in enumerate(loads):
        name = labels[i] if labels is not None else None
        unused = int((v <= 0).sum())
        ax.hist(v[v > 0], bins=edges, alpha=0.55, color=f"C{i}",
                label=(f"{name} ({unused} never used)" if name else f"{unused} never used"))
    ax.axvline(1.0, color="black", linestyle=":", label="uniform")
    ax.set_xscale("log")
    ax.set_xlabel("load relative to uniform (mean coefficient x number of experts)")
    ax.set_ylabel("experts")
    ax.legend(fontsize=7)
    ax.set_title(title or "Expert usage", fontsize=10)
    return _finish(fig, path)
