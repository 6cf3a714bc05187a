"""The rank explorer end to end: table, sweep, PNG, and one-line errors with a non-zero exit."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tensormoe.layers import accounting
from tensormoe.cli import main
from tensormoe.ranks import match_ranks

ROOT = Path(__file__).resolve().parents[1]


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def rows(out):
    """Table rows by their first cell."""
    return {line.split()[0]: line.split() for line in out.splitlines() if line.split()}


def test_table_lists_every_factorization_with_its_matched_ranks_and_costs(capsys):
    code, out, err = run(["ranks", "--in", "96", "--out", "80", "--experts", "12", "--budget", "linear",
                          "--batch", "8"], capsys)
    assert code == 0 and err == ""
    table = rows(out)
    for kind, m in match_ranks(96, 80, [12], "linear").items():
        c = m.cost(batch_size=8)
        assert table[kind][-7] == f"{c.params:,}", kind
        assert table[kind][-4] == f"{c.flops / 8:,.0f}", kind
        assert table[kind][-1] == f"{c.peak_intermediate:,}", kind
    assert table["linear"][2] == f"{accounting.linear_params(96, 80):,}"
    assert "R=" in " ".join(table["cp"])


def test_budget_below_a_familys_minimum_is_shown_not_fatal(capsys):
    # cp, 8 -> 8, 4 experts: rank r costs r * (4 + 9 + 8) plus 8 * 4 gates, so 60 buys r = 1 and 40 buys nothing
    code, out, _ = run(["ranks", "--in", "8", "--out", "8", "--experts", "4", "--budget", "60", "--kinds", "cp"],
                       capsys)
    assert code == 0 and rows(out)["cp"][1:3] == ["R=1", "53"]
    code, out, _ = run(["ranks", "--in", "8", "--out", "8", "--experts", "4", "--budget", "40"], capsys)
    assert code == 0 and "needs >= 53" in " ".join(rows(out)["cp"])


def test_sweep_and_plot_write_a_png(tmp_path, capsys):
    png = tmp_path / "ranks.png"
    code, out, err = run(["ranks", "--in", "10", "--out", "8", "--experts", "6", "--budget", "0.5", "--synthetic", "3",
                          "--noise", "0.01", "--sweep-ranks", "1,3", "--n-iter", "30", "--plot", str(png)], capsys)
    assert code == 0, err
    assert "reconstruction error" in out and str(png) in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    errors = {(line.split()[0], line.split()[1]): float(line.split()[-3])
              for line in out.split("reconstruction error")[1].splitlines()[2:] if line[:2] in ("cp", "tu", "tt", "tr")}
    # rank 3 captures a CP-rank-3 tensor up to the 1% noise; rank 1 cannot
    assert errors[("cp", "R=3")] < 0.02 < errors[("cp", "R=1")]


def test_sweep_of_a_tensor_file(tmp_path, capsys):
    path = tmp_path / "w.npy"
    np.save(path, np.random.default_rng(0).normal(size=(4, 6, 5)))
    code, out, err = run(["ranks", "--tensor", str(path), "--kinds", "tt,tucker", "--sweep-ranks", "1,2",
                          "--budget", "100"], capsys)
    assert code == 0, err
    assert "MMoE 5 -> 5, experts [4]" in out and "tensor_train" in out and "tucker" in out


def test_sweep_reports_ranks_a_decomposition_cannot_take_and_goes_on(tmp_path, capsys):
    path = tmp_path / "small.npy"
    np.save(path, np.random.default_rng(0).normal(size=(2, 3, 2)))
    code, out, err = run(["ranks", "--tensor", str(path), "--no-bias", "--no-gates", "--kinds", "cp",
                          "--sweep-ranks", "1,5",
                          "--budget", "1.0"], capsys)
    assert code == 0
    assert "cp at ranks 5 skipped: rank=5 exceeds 4" in err  # ALS needs rank <= min over modes of the others' product
    assert "R=1" in out.split("reconstruction error")[1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ranks", "--in", "-3", "--out", "8", "--experts", "4"], "--in: expected a positive integer; got '-3'"),
        (["ranks", "--in", "8", "--out", "8", "--experts", "4", "--budget", "lots"], "expected 'linear'"),
        (["ranks", "--in", "8", "--out", "8", "--experts", "4", "--budget", "2.5"], "(0, 1]"),
        (["ranks", "--in", "8", "--out", "8", "--experts", "0"], "--experts: expected a positive integer"),
        (["ranks", "--in", "8", "--out", "8"], "missing --experts"),
        (["ranks", "--in", "8", "--out", "8", "--experts", "4", "--kinds", "cp,svd"], "--kinds"),
        (["ranks", "--in", "8", "--out", "8", "--experts", "4", "--sweep"], "--sweep needs a tensor"),
        (["ranks", "--tensor", "/nonexistent/w.npy"], "could not be read"),
        (["ranks", "--in", "8", "--out", "8", "--experts", "4", "--optimize", "fastest"], "optimize='fastest'"),
        (["ranks", "--in", "99", "--out", "99", "--experts", "99", "--synthetic", "2", "--max-entries", "1000"],
         "--max-entries"),
        (["ranks", "--in", "8", "--out", "8", "--experts", "4", "--plot", "/nonexistent/dir/r.png"],
         "folder does not exist"),
        (["ranks", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        ([], "a command is required"),
    ],
)
def test_bad_arguments_exit_non_zero_with_one_line(argv, message, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("tensormoe: error: ")


def test_python_dash_m_runs_without_torch_or_jax():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TENSORMOE_BACKEND": "pytorch"}
    code = (
        "import sys, runpy; sys.argv = ['tensormoe', 'ranks', '--in', '768', '--out', '768', '--experts', '64'];"
        "\ntry:\n    runpy.run_module('tensormoe', run_name='__main__')\nexcept SystemExit as e:\n    status = e.code"
        "\nassert status == 0, status\nassert 'torch' not in sys.modules and 'jax' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "tr " in done.stdout and "590,592" in done.stdout

    bad = subprocess.run([sys.executable, "-m", "tensormoe", "ranks", "--in", "x"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stdout == ""


class _Terminal:
    """A stand-in for a terminal's stderr: tqdm draws bars only where ``isatty()`` is true."""

    def __init__(self):
        self.text = []

    def write(self, text):
        self.text.append(text)

    def flush(self):
        pass

    def isatty(self):
        return True


def test_progress_bars_on_a_terminal_and_not_with_quiet(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tqdm")
    pytest.importorskip("matplotlib")
    argv = ["ranks", "--in", "6", "--out", "5", "--experts", "3", "--kinds", "cp,tt", "--synthetic", "2",
            "--sweep-ranks", "1,2", "--n-iter", "5", "--plot", str(tmp_path / "r.png")]
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(argv) == 0
    drawn = "".join(terminal.text)
    assert "decompositions:" in drawn and "0/4 " in drawn  # 2 kinds x 2 ranks
    assert "plot: costs against rank" in drawn
    terminal.text.clear()
    assert main([*argv, "--quiet"]) == 0
    assert "".join(terminal.text) == ""


@pytest.mark.parametrize("argv", [["--help"], ["ranks", "--help"]])
def test_help_has_usage_examples_and_describes_every_option(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "examples:\n  tensormoe ranks --in 768" in out
    if argv == ["ranks", "--help"]:
        assert "standard output" in out and "--plot writes one PNG" in out


def test_every_option_has_a_help_text():
    from tensormoe.tools.cli import _parser

    parsers, undocumented = [_parser()], []
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
            if not (action.help or "").strip():
                undocumented.append(f"{parser.prog}: {'/'.join(action.option_strings) or action.dest}")
    assert undocumented == []
