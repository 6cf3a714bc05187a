"""The GPT example: its quick run trains every MLP kind (the loss falls) and writes its analysis and figures."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest
from helpers import BACKENDS

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
if "pytorch" not in BACKENDS:
    pytest.skip("the GPT example trains with PyTorch", allow_module_level=True)

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "gpt_mmoe.py"


def load_example():
    if "gpt_mmoe" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpt_mmoe", EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpt_mmoe"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["gpt_mmoe"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt")
    results = load_example().main(["--quick", "--quiet", "--out", str(out)])
    return results, out


def test_quick_run_trains_and_analyses(quick):
    results, out = quick
    models = results["models"]
    assert list(models) == ["linear", "cp", "tr", "top2"]
    linear = models["linear"]["mlp_params"]
    for kind, r in models.items():
        assert r["last_loss"] < r["first_loss"] - 0.3, (kind, r["first_loss"], r["last_loss"])  # it learns
        assert r["mlp_params"] <= linear  # parameter-matched: never above the linear MLP
        assert r["train_tokens_per_s"] > 0 and r["infer_tokens_per_s"] > 0
        if kind == "linear":
            continue
        a = r["analysis"]
        assert all(0 < b["specialisation"] <= 1 and 1 <= b["effective_experts_per_token"] <= 8 for b in a["blocks"])
        p = a["polysemanticity"]
        assert p["mean"] is None or 0 <= p["mean"] <= p["uniform_bound"]
        # the permanent removal of an expert (both layers' slices) is its removal at inference
        assert a["permanent_removal"]["max_abs_logit_difference"] <= 1e-4 * max(1.0, a["permanent_removal"]["max_abs_logit"])
        # copying another expert lies in the span of the shared factors: exact, and no other expert moves
        assert a["edit"]["achieved"] == pytest.approx(1.0, abs=1e-3) and a["edit"]["leakage"] == 0.0
        assert 0 <= a["edit"]["rank_one_achieved"] <= 1 and a["edit"]["rank_one_leakage"] == 0.0
        assert {c["mode"] for c in a["curves"]} == {"after", "before"}
        for c in a["curves"]:
            assert len(c["target_accuracy"]) == len(c["order"]) + 1 == 5
        assert a["counterfactual"] and all(r["class_change"] < 0 for r in a["counterfactual"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"]["cp"]["val_loss"] == pytest.approx(models["cp"]["val_loss"])
    for path in results["figures"]:
        assert pathlib.Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {pathlib.Path(p).name for p in results["figures"]} >= {"usage.png", "ablation_curve.png", "heatmap_cp.png"}


def test_sparse_top2_path_equals_the_coefficient_path():
    import torch

    example = load_example()
    args = example.parse(["--quick", "--quiet"])
    model = example.build_model("top2", 20, args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    model.eval()
    x = torch.randint(0, 20, (3, args.block))
    with torch.no_grad():
        sparse = model(x)
        model.blocks[0].mlp.sparse = False
        dense = model(x)
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-5)


def test_help_and_argument_errors(capsys):
    example = load_example()
    with pytest.raises(SystemExit) as exit_:
        example.parse(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--models", "--steps", "--experts", "--out", "--quick", "--threads", "--analyse-layer", "--ablate"):
        assert option in text
    assert "python examples/gpt_mmoe.py --quick" in text
    for argv, message in [(["--models", "linear,moe"], "expected a comma-separated list of linear, cp, tr, top2"),
                          (["--steps", "0"], "expected a positive integer; got '0'"),
                          (["--heads", "3"], "argument --heads: 3 must divide --embd 64"),
                          (["--ablate", "99"], "argument --ablate: 99 exceeds --experts 64"),
                          (["--lr", "nan"], "expected a positive number; got 'nan'"),
                          (["--out", "/proc/no/such"], "argument --out: cannot create the folder '/proc/no/such'")]:
        with pytest.raises(SystemExit) as exit_:
            example.parse(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_corpus_is_python_docs_and_windows_predict_the_next_character():
    example = load_example()
    corpus = example.load_corpus()
    assert len(corpus.train) > 300_000 and corpus.vocab > 60
    x, y = example.eval_windows(corpus, 16, 160)
    assert x.shape == y.shape == (10, 16)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
