"""`python -m benchmarks gpu --device cpu --quick`: every phase runs on the CPU and the report names the
device; a failing phase is reported and the next one still runs."""
from __future__ import annotations

import json

import benchmarks.gpu
from benchmarks.__main__ import main


def test_gpu_command_runs_every_phase_on_the_cpu_and_writes_its_report(tmp_path):
    out = tmp_path / "gpu"
    assert main(["gpu", "--device", "cpu", "--quick", "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["device"] == "CPU" and report["settings"]["quick"]
    assert {name: phase["status"] for name, phase in report["phases"].items()} == dict.fromkeys(
        benchmarks.gpu.PHASES, "ok")
    assert all(phase["seconds"] <= phase["budget_s"] + 30 for phase in report["phases"].values())
    assert report["phases"]["graphs"]["graphs_after_each_resolution"] == [1, 2, 2]
    loaders = {(row["backend"], row["storage"]) for row in report["results"]}
    assert loaders == {(backend, storage) for backend in ("ffcv", "dali-cpu", "torch") for storage in ("raw", "jpg")}
    training = report["training"]
    assert {row["arch"] for row in training} == {"resnet50", "resnet18"}
    assert all(row["ratio_to_synthetic"] == 1.0 for row in training if row["feed"] == "synthetic")
    assert {row["feed"] for row in training} == {"synthetic", "ffcv", "dali", "torch"}
    markdown = (out / "results.md").read_text()
    assert "fastpipe on CPU" in markdown and "## Phases" in markdown and "x synthetic" in markdown
    assert (out / "img_per_s_vs_resolution.png").stat().st_size > 1000


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
