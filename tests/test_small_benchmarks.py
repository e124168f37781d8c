"""`python -m benchmarks lr-sweep` and `python -m benchmarks quality` in their --quick forms: the commands run
end to end on a tiny generated set and write their tables, so they cannot rot."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from benchmarks.__main__ import main
from fastpipe.report import RunReport


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    monkeypatch.setattr(RunReport, "plot", lambda self, **kwargs: {})


def test_lr_sweep_quick_trains_each_lr_and_auto_and_compares_every_rule(tmp_path, capsys):
    assert main(["lr-sweep", "--quick", "--out", str(tmp_path)]) == 0
    [row] = json.loads((tmp_path / "results.json").read_text())
    assert row["set"] == "synthetic" and [item["lr"] for item in row["fixed"]] == [0.02, 2.0]
    assert row["best_lr"] in (0.02, 2.0) and 0 <= row["auto_top1"] <= 1
    assert set(row["rules"]) == {"edge", "steepest", "min_loss_div10", "valley", "min_loss", "min_loss_div2"}
    assert row["rules"][row["rule"]] == pytest.approx(row["auto_lr"])   # lr=auto trained with the chosen rule
    table = pd.read_csv(tmp_path / "results.csv")
    assert set(table["kind"]) == {"fixed", "auto", "rule:edge", "rule:steepest", "rule:min_loss_div10", "rule:valley", "rule:min_loss",
                                  "rule:min_loss_div2"}
    assert (tmp_path / "lr_sweep.png").stat().st_size > 10_000
    assert "| synthetic | 120 |" in capsys.readouterr().out


def test_quality_quick_prints_top1_and_wall_time_per_recipe(tmp_path, capsys):
    assert main(["quality", "--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert {(r["recipe"], r["set"]) for r in rows} == {("small", "synthetic"), ("r18-imagenet", "synthetic")}
    assert all(0 <= r["top1"] <= 1 and r["wall_s"] > 0 and r["epochs"] == 1 for r in rows)
    printed = capsys.readouterr().out
    assert "| small | synthetic | 120 | 1 |" in printed and (tmp_path / "results.md").is_file()
