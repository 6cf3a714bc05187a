"""Tools built on the layers: weights files, rank matching, compression, analysis, plots, the CLI.

* :mod:`~tensormoe.tools.io`: safetensors and ``.npz`` weights files;
* :mod:`~tensormoe.tools.reference`: checkpoints of the reference muMoE implementation;
* :mod:`~tensormoe.tools.ranks`: ranks that fit a parameter budget;
* :mod:`~tensormoe.tools.compress`: a dense weight tensor or linear layer compressed into a factorization;
* :mod:`~tensormoe.tools.analysis`: expert usage, ablation, interventions, edits;
* :mod:`~tensormoe.tools.plots`: figures of the analyses (matplotlib, imported when used);
* :mod:`~tensormoe.tools.numerics`: rounding-error bounds of the forward;
* :mod:`~tensormoe.tools.cli`: the ``tensormoe`` command line.

The old paths (``tensormoe.io``, ``tensormoe.ranks``, ...) re-export these modules.
"""

__all__: list[str] = []
