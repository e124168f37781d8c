"""A trained run answers about new images (`fastpipe.predict`) and leaves as a file (`fastpipe.export`)."""
from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pytest
import torch

from fastpipe import export as export_module
from fastpipe.config import load_config
from fastpipe.data.beton import FILE_MODE
from fastpipe.export import main as export_main
from fastpipe.predict import main as predict_main
from fastpipe.report.run import RunReport
from fastpipe.train import Trainer

TINY = ["--data.workers=1", "--data.batch_size=16", "--resolution.start=32", "--resolution.end=32",
        "--resolution.val=32", "--schedule.epochs=2", "--train.log_every=100", "--optim.lr=0.1",
        "--model.width=16"]


@pytest.fixture(scope="module")
def run_dir(betons, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RunReport, "plot", lambda self, **kwargs: {})
        patch.setattr(RunReport, "plot_later", lambda self: None)
        config = load_config("configs/cpu-smoke.toml", [f"--data.path={betons}", f"--run.dir={run}", *TINY])
        assert Trainer(config, run).fit() == 0
    return run


def test_predict_reads_files_folders_and_globs_and_agrees_with_the_run_s_evaluation(run_dir, synthetic_folder,
                                                                                     tmp_path, capsys):
    val = synthetic_folder / "val"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    out = tmp_path / "predictions.csv"
    one_class = min(val.iterdir())
    assert predict_main([str(run_dir), str(val / "class001"), str(one_class / "*.JPEG"), str(broken),
                         "--top-k", "3", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.read_text().splitlines()))
    files = sorted((val / "class001").iterdir()) + sorted(one_class.glob("*.JPEG"))
    assert [row["path"] for row in rows] == [str(p) for p in files] + [str(broken)]   # each once, in order
    assert rows[-1]["error"] and not rows[-1]["class_1"]   # listed with its reason, not dropped
    good = rows[:-1]
    assert all(row["class_1"] in {"class000", "class001", "class002", "class003"} for row in good)
    assert all(float(row["prob_1"]) >= float(row["prob_2"]) >= float(row["prob_3"]) for row in good)
    # the same images through the run's own evaluation: the top-1 classes mostly agree (the loader crops the
    # converted, resized copy; predict crops the original file)
    evaluated = pd.read_csv(run_dir / "predictions.csv").set_index("path")["predicted"]
    by_name = {f"val/{path.parent.name}/{path.name}": row["class_1"] for path, row in zip(files, good)}
    agree = np.mean([evaluated[name] == predicted for name, predicted in by_name.items()])
    assert agree >= 0.75, agree
    assert "could not be read" in capsys.readouterr().err


def test_predict_says_what_is_missing(run_dir, tmp_path, capsys):
    assert predict_main([str(run_dir), str(tmp_path / "nothing.jpg")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert predict_main([str(tmp_path), str(tmp_path)]) == 2
    assert "config.toml" in capsys.readouterr().err


def test_predict_lists_every_file_once_and_tells_what_it_cannot_do(run_dir, synthetic_folder, tmp_path, capsys,
                                                                    monkeypatch):
    from PIL import Image

    image = min((synthetic_folder / "val" / "class000").iterdir())
    thin = tmp_path / "thin.png"
    Image.fromarray(np.zeros((50, 1, 3), np.uint8)).save(thin)   # 1 px wide: no centre crop
    monkeypatch.chdir(image.parent)
    out = tmp_path / "k9.csv"
    # one file by two spellings (relative, absolute), a thin image, more classes asked for than the run has
    assert predict_main([str(run_dir), image.name, str(image), str(thin), "--top-k", "9", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert [row["path"] for row in rows] == [image.name, str(thin)]
    assert list(rows[0]) == ["path", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3", "class_4",
                             "prob_4", "error"]   # the run's 4 classes, not 9 columns of which 5 empty
    assert "too small for the centre crop" in rows[1]["error"]
    for bad in ("0", "-2"):
        with pytest.raises(SystemExit):
            predict_main([str(run_dir), image.name, "--top-k", bad])
        assert "must be 1 or more" in capsys.readouterr().err
    if not torch.cuda.is_available():   # a run that trained on a GPU, asked here: an error line, not a traceback
        assert predict_main([str(run_dir), image.name, "--train.device=cuda"]) == 1
        assert "--train.device=cpu" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exports_match_the_pytorch_model_and_record_the_check(run_dir, tmp_path, fmt):
    out = tmp_path / f"model.{fmt}"
    assert export_main([str(run_dir), "--format", fmt, "--out", str(out)]) == 0
    record = json.loads((tmp_path / f"model.{fmt}.json").read_text())
    check = record["check"]
    assert check["max_abs_difference"] <= check["tolerance"] and check["relative_tolerance"] == export_module.TOLERANCE
    assert check["tolerance"] >= export_module.TOLERANCE and record["evaluation"]["weights"] in ("ema", "trained")
    assert record["classes"] == ["class000", "class001", "class002", "class003"]
    # readable as any new file is (mkstemp's temporaries are 0600)
    assert out.stat().st_mode & 0o777 == FILE_MODE == (tmp_path / f"model.{fmt}.json").stat().st_mode & 0o777
    batch = torch.randn(3, 3, 32, 32)   # another batch size than the check's
    if fmt == "torchscript":
        logits = torch.jit.load(str(out))(batch)
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        logits = torch.from_numpy(session.run(None, {"images": batch.numpy()})[0])
    assert logits.shape == (3, 4)


def test_an_export_that_does_not_match_is_not_written(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export_module, "TOLERANCE", -1.0)
    out = tmp_path / "model.pt"
    assert export_main([str(run_dir), "--format", "torchscript", "--out", str(out)]) == 1
    assert "nothing was written" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".model.pt.*"))
