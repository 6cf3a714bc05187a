"""The reference implementation's README calls run verbatim on tensormoe.torch (issue 14), with their warnings.

Only the import lines change (``from MMoE import ...`` / ``from MuMoE import ...``); the newer README calls
``MuMoE`` without importing it, so its import is added.  The reference's ``TTMMoE`` is one class for trains
and rings: it is tensormoe's ``TRMMoE`` (a ring whose boundary bond is 1 is a train), imported under its name.

Two sources of the blocks: the calls below (every run, CI included), and the READMEs of every version in
the reference's git history where its mirror is present (read at test time, never vendored).
"""

from __future__ import annotations

import os
import re
import subprocess
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from tensormoe.network.factorizations import OverparameterizedWarning, RankWarning  # noqa: E402

REFERENCE_REPO = Path(os.environ.get("TENSORMOE_REFERENCE_REPO", "/work/.mirror/james-oldfield+muMoE/repo"))

#: the reference's import lines -> tensormoe's
IMPORTS = {
    "from MMoE import CPMMoE": "from tensormoe.torch import CPMMoE",
    "from MMoE import TuckerMMoE": "from tensormoe.torch import TuckerMMoE",
    "from MMoE import TTMMoE": "from tensormoe.torch import TRMMoE as TTMMoE",
    "from MuMoE import CPMuMoE": "from tensormoe.torch import MuMoE, CPMMoE as CPMuMoE",
    "from MuMoE import TRMuMoE": "from tensormoe.torch import MuMoE, TRMMoE as TRMuMoE",
}

PRELUDE = "import torch\n{import}\n\nn_experts = 32; batch_size = 4; in_dim = 4; out_dim = 8\nx = torch.randn(batch_size, in_dim)\n"

#: (import line, the calls after the prelude, the warnings each ``model = ...`` gives in order)
BLOCKS = [
    ("from MMoE import CPMMoE",
     "R = 32\nmodel = CPMMoE(in_dim, out_dim, expert_dims=[n_experts], rank=R)\ny = model(x)\n"
     "model = CPMMoE(in_dim, out_dim, expert_dims=[n_experts, 2], rank=R, hierarchy=2)\ny = model(x)\n",
     [[OverparameterizedWarning], []]),
    ("from MMoE import TuckerMMoE",
     "ranks = [8, 8, 8]\nmodel = TuckerMMoE(in_dim, out_dim, expert_dims=[n_experts], ranks=ranks)\ny = model(x)\n"
     "ranks = [8, 8, 8, 8]\n"
     "model = TuckerMMoE(in_dim, out_dim, expert_dims=[n_experts, 2], ranks=ranks, hierarchy=2)\ny = model(x)\n",
     [[RankWarning], [RankWarning, OverparameterizedWarning]]),
    ("from MMoE import TTMMoE",
     "r1 = 1 ; r2 = 4 ; r3 = 4\nr1 = 4 ; r2 = 4 ; r3 = 4\n"
     "ranks = [[r1, n_experts, r2], [r2, in_dim, r3], [r3, out_dim, r1]]\n"
     "model = TTMMoE(in_dim, out_dim, expert_dims=[n_experts], ranks=ranks)\ny = model(x)\n"
     "r1 = 1 ; r2 = 4 ; r3 = 4 ; r4 = 4\nr1 = 4 ; r2 = 4 ; r3 = 4 ; r4 = 4\n"
     "ranks = [[r1, n_experts, r2], [r2, n_experts, r3], [r3, in_dim, r4], [r4, out_dim, r1]]\n"
     "model = TTMMoE(in_dim, out_dim, expert_dims=[n_experts, 2], ranks=ranks, hierarchy=2)\ny = model(x)\n",
     [[], [RankWarning]]),
    ("from MuMoE import CPMuMoE",
     "R = 32\n"
     "model = MuMoE(input_dim=in_dim, output_dim=out_dim, MuMoE_layer=CPMuMoE, expert_dims=[n_experts], ranks=R)\n"
     "y = model(x)\n"
     "model = MuMoE(input_dim=in_dim, output_dim=out_dim, MuMoE_layer=CPMuMoE, expert_dims=[n_experts, 2], ranks=R, "
     "hierarchy=2)\ny = model(x)\n",
     [[OverparameterizedWarning], []]),
    ("from MuMoE import TRMuMoE",
     "r1 = 4 ; r2 = 4 ; r3 = 4\nranks = [[r1, n_experts, r2], [r2, in_dim, r3], [r3, out_dim, r1]]\n"
     "model = MuMoE(input_dim=in_dim, output_dim=out_dim, MuMoE_layer=TRMuMoE, expert_dims=[n_experts], ranks=ranks)\n"
     "y = model(x)\n"
     "r1 = 4 ; r2 = 4 ; r3 = 4 ; r4 = 4\n"
     "ranks = [[r1, n_experts, r2], [r2, n_experts, r3], [r3, in_dim, r4], [r4, out_dim, r1]]\n"
     "model = MuMoE(input_dim=in_dim, output_dim=out_dim, MuMoE_layer=TRMuMoE, expert_dims=[n_experts, 2], "
     "ranks=ranks, hierarchy=2)\ny = model(x)\n",
     [[], [RankWarning]]),
]


def _run(code):
    """Execute a README block statement by statement; the models, outputs and warnings of each ``model = ...``."""
    namespace, models = {}, []
    for statement in re.split(r"\n(?=\S)", code.strip()):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exec(statement, namespace)  # noqa: S102  (this file's own blocks, or the reference's README)
        if statement.startswith("model ="):
            models.append([namespace["model"], None, [w.category for w in caught]])
        elif statement.startswith("y =") and models:
            models[-1][1] = namespace["y"]
            models[-1][2] += [w.category for w in caught]
    return namespace, models


def _check(namespace, models, batchnorm, expected=None):
    """``batchnorm``: MuMoE's default gates (as the reference's); MMoE.py's classes are tensormoe's, LayerNorm gates."""
    assert models, "the block built no model"
    for k, (model, y, caught) in enumerate(models):
        assert model.training  # a fresh module is in training mode, as the reference's
        assert tuple(y.shape) == (4, 8)  # the reference: [4, 8] (MMoE.py), [4, 1, 8] (MuMoE): the shape note
        assert torch.isfinite(y).all()
        # BatchNorm gates in training: one batch seen, the running statistics moved towards its statistics
        counts = [int(b) for name, b in model.named_buffers() if name.endswith("num_batches_tracked")]
        assert counts == ([1] * len(model.expert_dims) if batchnorm else [])
        if expected is not None:
            assert sorted(c.__name__ for c in caught) == sorted(c.__name__ for c in expected[k]), (k, caught)


@pytest.mark.parametrize("import_line, calls, expected", BLOCKS, ids=[b[0].split()[-1] for b in BLOCKS])
def test_readme_block_runs_verbatim_with_its_warnings(import_line, calls, expected):
    namespace, models = _run(PRELUDE.format(**{"import": IMPORTS[import_line]}) + calls)
    _check(namespace, models, "MuMoE" in import_line, expected)


def _readme_blocks():
    if not (REFERENCE_REPO / "HEAD").exists():
        return []
    out = []
    for commit in ("ee12f8a", "e62681a", "95ada56", "3fa814b", "80fd4da"):
        text = subprocess.run(["git", "-C", str(REFERENCE_REPO), "show", f"{commit}:readme.md"], capture_output=True,
                              text=True, check=True).stdout
        for k, block in enumerate(re.findall(r"```python\n(.*?)```", text, flags=re.S)):
            out.append(pytest.param(block, id=f"{commit}-{k}"))
    return out


@pytest.mark.skipif(not (REFERENCE_REPO / "HEAD").exists(), reason="the reference's mirror is not here (CI)")
@pytest.mark.parametrize("block", _readme_blocks())
def test_every_readme_of_the_reference_runs_with_only_its_imports_changed(block):
    lines = block.splitlines()
    imports = [line for line in lines if line.startswith(("from MMoE", "from MuMoE"))]
    assert imports, block
    code = "\n".join(IMPORTS.get(line, line) for line in lines)
    assert "from MMoE" not in code and "from MuMoE" not in code, f"an import this test does not know: {imports}"
    namespace, models = _run(code)
    _check(namespace, models, "from MuMoE" in block)
