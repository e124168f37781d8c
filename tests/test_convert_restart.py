"""Restart intervals in JPEG storage: the converter writes them (pixels as without them), `convert restart`
adds them to existing betons losslessly, and every reader (the crop decoder, FFCV's stock decoder, DALI on
the CPU) reads the new betons as before."""
from __future__ import annotations

import re
import shutil

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from convert.__main__ import main
from fastpipe.data import build_loader, crop_decode
from fastpipe.data.beton import MODE_JPEG, BetonSamples, read_manifest
from fastpipe.data.restarts import restart_interval

pytestmark = pytest.mark.skipif(not crop_decode.available(), reason=crop_decode.MISSING)


def photo(rng, height: int, width: int) -> np.ndarray:
    base = rng.integers(0, 255, (height // 24 + 1, width // 24 + 1, 3)).astype(np.uint8)
    base = cv2.resize(base, (width, height), interpolation=cv2.INTER_CUBIC)
    return (base + rng.normal(0, 10, (height, width, 3))).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("restart") / "images"
    rng = np.random.default_rng(0)
    for label in range(3):
        (root / f"class{label}").mkdir(parents=True)
        for index in range(6):
            height, width = int(rng.integers(200, 420)), int(rng.integers(200, 520))
            Image.fromarray(photo(rng, height, width)).save(root / f"class{label}" / f"{index}.jpg", quality=95)
    return root


def convert(folder, out, *options) -> None:
    assert main(["folder", str(folder), "--out", str(out), "--write-mode", "jpg", "--max-resolution", "512",
                 "--val-fraction", "0.3", "--workers", "2", *options]) == 0


def decoded(samples: BetonSamples, index: int) -> np.ndarray:
    return cv2.imdecode(np.asarray(samples.encoded(index)), cv2.IMREAD_COLOR)


def intervals(data: bytes) -> int:
    return len(re.findall(rb"\xff[\xd0-\xd7]", data)) + 1


def test_converted_jpegs_have_restart_intervals_and_the_same_pixels(folder, tmp_path):
    convert(folder, tmp_path / "plain", "--no-restart-intervals")
    convert(folder, tmp_path / "marked")
    assert read_manifest(tmp_path / "marked")["splits"]["train"]["settings"]["restart_intervals"] is True
    stored = {"plain": 0, "marked": 0}
    for split in ("train", "val"):
        plain, marked = (BetonSamples(tmp_path / name / f"{split}.beton") for name in ("plain", "marked"))
        assert np.array_equal(plain.labels, marked.labels) and (marked.mode == MODE_JPEG).all()
        for index in range(len(plain)):
            data = bytes(marked.encoded(index))
            assert b"\xff\xdd" not in bytes(plain.encoded(index)) and b"\xff\xdd" in data
            mcus = crop_decode.mcus_per_row(data)
            rows = -(-int(marked.height[index]) // 16)
            assert intervals(data) == mcus * rows // restart_interval(mcus)   # intervals tile every row
            np.testing.assert_array_equal(decoded(plain, index), decoded(marked, index))
            stored["plain"] += int(plain.size[index])
            stored["marked"] += int(marked.size[index])
    assert stored["marked"] <= 1.03 * stored["plain"]   # the markers' cost, at most 3%
    assert main(["verify", str(tmp_path / "marked")]) == 0


def batches(data_dir, backend: str, **options) -> list[torch.Tensor]:
    loader = build_loader(backend, data_dir, "val", batch_size=4, resolution=64, workers=1, **options)
    return [images.clone() for images, _ in loader]


def test_convert_restart_rewrites_losslessly_and_every_reader_reads_the_result_alike(folder, tmp_path):
    convert(folder, tmp_path / "before", "--no-restart-intervals")
    shutil.copytree(tmp_path / "before", tmp_path / "after")
    assert main(["restart", str(tmp_path / "after"), "--workers", "2"]) == 0
    manifest = read_manifest(tmp_path / "after")
    for split in ("train", "val"):
        before, after = (BetonSamples(tmp_path / name / f"{split}.beton") for name in ("before", "after"))
        assert np.array_equal(before.labels, after.labels) and len(before) == len(after)
        for index in range(len(before)):
            assert b"\xff\xdd" in bytes(after.encoded(index))
            np.testing.assert_array_equal(decoded(before, index), decoded(after, index))
        assert manifest["splits"][split]["settings"]["restart_intervals"] is True
    assert main(["verify", str(tmp_path / "after")]) == 0   # sizes and checksums updated
    crop_decode.reset_counters()
    for backend, options in (("ffcv", {"decoder": "crop"}), ("ffcv", {"decoder": "stock"}), ("dali", {})):
        for old, new in zip(batches(tmp_path / "before", backend, **options),
                            batches(tmp_path / "after", backend, **options), strict=True):
            assert torch.equal(old, new), (backend, options)
    assert crop_decode.read_counters()["restart_decodes"] > 0   # the crop decoder took the intervals' path


def test_convert_restart_keeps_what_it_cannot_rewrite_and_says_so(folder, tmp_path, capsys):
    """A progressive JPEG has no single scan to cut into intervals: it keeps its bytes and is counted."""
    from convert.restart import with_restarts

    rng = np.random.default_rng(1)
    progressive = cv2.imencode(".jpg", photo(rng, 100, 150), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    assert with_restarts(progressive) == (progressive, 0)
    assert with_restarts(b"\xff\xd8 not a jpeg")[1] == 0
    baseline = cv2.imencode(".jpg", photo(rng, 100, 150))[1].tobytes()
    rewritten, reason = with_restarts(baseline)
    assert reason == -1 and b"\xff\xdd" in rewritten
    assert main(["restart", str(tmp_path / "nothing-here")]) != 0
    assert "does not exist" in capsys.readouterr().err


def test_the_interval_divides_the_row_nearest_its_target():
    assert restart_interval(32) == 4 and restart_interval(30) == 3 and restart_interval(40) == 4
    assert restart_interval(31) == 31            # a prime row: one interval per row
    assert restart_interval(31, target=1) == 1   # one-MCU intervals only when asked for (the benchmark's sweep)
    assert restart_interval(30, target=2) == 2 and restart_interval(32, target=8) == 8


def test_convert_restart_checks_every_beton_first_and_keeps_the_manifest_in_step(folder, tmp_path, capsys,
                                                                                 monkeypatch):
    """A split's beton missing: nothing is rewritten. Stopped after the first split: the manifest already
    describes the rewritten beton, so verify passes and a second run finishes the job."""
    import convert.restart as restart_module

    convert(folder, tmp_path / "out", "--no-restart-intervals")
    (tmp_path / "out" / "val.beton").rename(tmp_path / "val.beton")
    before = (tmp_path / "out" / "train.beton").read_bytes()
    assert main(["restart", str(tmp_path / "out"), "--workers", "1"]) != 0
    assert "val.beton" in capsys.readouterr().err and (tmp_path / "out" / "train.beton").read_bytes() == before
    (tmp_path / "val.beton").rename(tmp_path / "out" / "val.beton")
    rewrite = restart_module.rewrite_beton

    def stop_after_train(path, *args):
        if path.name == "val.beton":
            raise KeyboardInterrupt
        return rewrite(path, *args)

    monkeypatch.setattr(restart_module, "rewrite_beton", stop_after_train)
    with pytest.raises(KeyboardInterrupt):
        restart_module.restart(tmp_path / "out", workers=1)
    settings = {split: info["settings"].get("restart_intervals")
                for split, info in read_manifest(tmp_path / "out")["splits"].items()}
    assert settings == {"train": True, "val": False}
    assert main(["verify", str(tmp_path / "out")]) == 0
