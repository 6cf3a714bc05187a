"""The factorized weight tensor as a tensor network, and how its contraction runs.

* :mod:`~tensormoe.network.factorizations`: CP, Tucker, TT and TR; each format's
  network (:meth:`~tensormoe.network.factorizations.Factorization.network`), from
  which every equation, parameter shape, gather and slice derives; its ranks,
  initialisation and dense reconstruction through TensorLy.
* :mod:`~tensormoe.network.contraction`: one opt_einsum path search per
  contraction, cached; the chosen program timed once and run.
* :mod:`~tensormoe.network.lowering`: a path lowered to straight-line matrix
  products over views of the operands (depends on nothing).

Nothing here imports a framework: arrays come with the framework code that
handles them (:mod:`tensormoe.frameworks`).
"""

__all__: list[str] = []
