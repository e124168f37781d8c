"""The converter benchmark runs end to end on a tiny set and writes its report."""
from __future__ import annotations

import json

from benchmarks.__main__ import main


def test_converter_benchmark_reports_throughput_per_worker_count(tmp_path):
    out = tmp_path / "report"
    assert main(["convert", "--work", str(tmp_path / "work"), "--out", str(out), "--images", "24", "--classes", "3",
                 "--workers", "2", "--skip", "storage,memory"]) == 0
    payload = json.loads((out / "results.json").read_text())
    rows = [row for row in payload["results"] if row["table"] == "throughput"]
    assert [row["workers"] for row in rows] == [1, 2]
    assert all(row["images"] == 24 and row["img_per_s"] > 0 for row in rows)
    assert "Conversion throughput" in (out / "results.md").read_text()
    sources = {row["source"]: row for row in payload["results"] if row["table"] == "sources"}
    assert list(sources) == ["folder", "webdataset", "imagenet"]   # the same images from each source
    assert {row["images"] for row in sources.values()} == {24} and sources["folder"]["vs_folder"] == 1.0
