"""`python -m benchmarks gpu --device cpu --quick`: every phase runs on the CPU and the report names the
device; a failing phase is reported and the next one still runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import benchmarks.gpu
from benchmarks.__main__ import main

REPO = Path(__file__).resolve().parent.parent


def test_gpu_command_runs_every_phase_on_the_cpu_and_writes_its_report(tmp_path):
    out = tmp_path / "gpu"
    assert main(["gpu", "--device", "cpu", "--quick", "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["device"] == "CPU" and report["settings"]["quick"]
    assert {name: phase["status"] for name, phase in report["phases"].items()} == dict.fromkeys(
        benchmarks.gpu.PHASES, "ok")
    assert all(phase["seconds"] >= 0 and phase["budget_s"] > 0 for phase in report["phases"].values())
    assert report["phases"]["graphs"]["graphs_after_each_resolution"] == [1, 2, 2]
    preflight = report["phases"]["preflight"]
    assert preflight["backends"] == {"ffcv": "ok", "dali": "ok", "torch": "ok"} and not preflight["missing"]
    assert preflight["crop_decoder"] == "installed"
    loaders = {(row["backend"], row["storage"]) for row in report["results"]}
    assert loaders == {(backend, storage) for backend in ("ffcv", "dali-cpu", "torch") for storage in ("raw", "jpg")}
    training = report["training"]
    assert {row["arch"] for row in training} == {"resnet50", "resnet18"}
    assert all(row["ratio_to_synthetic"] == 1.0 for row in training if row["feed"] == "synthetic")
    assert {row["feed"] for row in training} == {"synthetic", "ffcv", "dali", "torch"}
    epochs = report["epochs"]   # the short real run: seconds outside the step loop per epoch, by kind
    assert [row["epoch"] for row in epochs] == [1, 2]
    assert all({"epoch_start", "eval", "report", "plots", "checkpoint"} <= set(row) for row in epochs)
    assert all(row["eval"] > 0 and row["epoch_time_s"] > 0 for row in epochs)
    markdown = (out / "results.md").read_text()
    assert "fastpipe on CPU" in markdown and "## Phases" in markdown and "x synthetic" in markdown
    assert (out / "img_per_s_vs_resolution.png").stat().st_size > 1000


def test_a_spent_budget_skips_the_rest_of_a_phase_with_a_note():
    deadline, notes = benchmarks.gpu.Deadline(0), []
    assert not deadline.check("resnet50 training", notes)
    assert notes == ["budget spent: skipped resnet50 training"]
    assert benchmarks.gpu.Deadline(3600).check("anything", notes) and len(notes) == 1


def test_a_failing_phase_is_reported_and_the_next_one_still_runs(tmp_path, monkeypatch):
    def broken(ctx, deadline):
        raise RuntimeError("planted failure")

    monkeypatch.setitem(benchmarks.gpu.RUNNERS, "preflight", broken)
    out = tmp_path / "gpu"
    code = main(["gpu", "--device", "cpu", "--quick", "--skip", "tests,data,loaders,train", "--out", str(out)])
    assert code == 1
    phases = json.loads((out / "results.json").read_text())["phases"]
    assert phases["preflight"]["status"] == "failed" and "planted failure" in phases["preflight"]["error"]
    assert phases["graphs"]["status"] == "ok"
    assert phases["train"] == {"status": "skipped", "reason": "--skip"}


def test_preflight_fails_when_dali_is_installed_but_its_import_is_broken(tmp_path):
    """DALI's metadata says installed while `import nvidia.dali` fails (a missing dependency, as on a box
    without six): preflight must fail, name DALI and the fix, and the command must exit non-zero."""
    planted = tmp_path / "planted"
    (planted / "nvidia" / "dali").mkdir(parents=True)
    (planted / "nvidia" / "__init__.py").write_text("__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n")
    (planted / "nvidia" / "dali" / "__init__.py").write_text("raise ImportError(\"planted: No module named 'six'\")\n")
    out = tmp_path / "gpu"
    done = subprocess.run([sys.executable, "-m", "benchmarks", "gpu", "--device", "cpu", "--quick", "--skip",
                           "tests,data,loaders,train,graphs", "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": f"{planted}{os.pathsep}{REPO}"}, check=False)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    preflight = json.loads((out / "results.json").read_text())["phases"]["preflight"]
    assert preflight["status"] == "failed"
    assert preflight["versions"]["dali"] is not None          # the metadata alone would have said "healthy"
    assert "planted: No module named 'six'" in preflight["backends"]["dali"]
    assert "planted" in preflight["missing"]["dali"] and "wheelhouse" in preflight["missing"]["dali"]
    assert preflight["backends"]["ffcv"] == preflight["backends"]["torch"] == "ok"
    assert "dali" in preflight["error"]


def test_a_failing_loader_fails_preflight_and_its_phases_and_the_exit_status(tmp_path, monkeypatch):
    from fastpipe.data.torch_backend import TorchLoader

    def broken(self):
        raise RuntimeError("planted loader failure")

    monkeypatch.setattr(TorchLoader, "__iter__", broken)
    out = tmp_path / "gpu"
    assert main(["gpu", "--device", "cpu", "--quick", "--skip", "tests,graphs", "--out", str(out)]) == 1
    report = json.loads((out / "results.json").read_text())
    phases = report["phases"]
    assert phases["preflight"]["status"] == "failed" and "planted loader failure" in phases["preflight"]["backends"]["torch"]
    assert phases["data"]["status"] == "ok"
    assert phases["loaders"]["status"] == "failed" and "torch" in phases["loaders"]["error"]
    assert phases["train"]["status"] == "failed" and "fed by torch" in phases["train"]["error"]
    # the healthy backends' figures are still reported
    assert {row["backend"] for row in report["results"]} == {"ffcv", "dali-cpu"}
    assert {row["feed"] for row in report["training"]} == {"synthetic", "ffcv", "dali"}
