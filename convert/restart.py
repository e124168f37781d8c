"""`python -m convert restart DIR`: give the JPEG samples of converted or adopted betons restart intervals,
losslessly, so that the crop decoder entropy-decodes only the intervals a crop covers.

Each JPEG sample is rewritten as jpegtran -restart would (its DCT coefficients copied, not decoded:
`crop_decode.add_restarts`), then both versions are decoded and compared pixel for pixel; a sample that
libjpeg rejects, that is not a single-scan sequential JPEG (progressive, say) or whose pixels would change
keeps its bytes and is counted. Raw samples, labels and the sample order stay as they are. Each beton is
written by FFCV's own writer to a temporary file beside it and renamed over it; the manifest gets the new
sizes and checksums last.
"""
from __future__ import annotations

import functools
import multiprocessing as mp
import os
import threading
from pathlib import Path

import cv2
import numpy as np
from rich.console import Console

from convert.pipeline import make_progress
from convert.sources import ConvertError
from convert.write import chunk_size
from fastpipe.data import crop_decode
from fastpipe.data.beton import (
    IMAGE_FIELD,
    MODE_JPEG,
    BetonSamples,
    fsync_dir,
    fsync_file,
    read_fields,
    read_header,
    read_manifest,
    sha256_file,
    split_info,
    write_json_atomic,
)
from fastpipe.data.restarts import restart_interval

KEPT_REASONS = ("not a single-scan sequential JPEG", "libjpeg rejects it", "pixels would change")


def with_restarts(jpeg: bytes) -> tuple[bytes, int]:
    """(the JPEG with restart intervals, -1) or (the JPEG unchanged, the index of the reason in KEPT_REASONS).
    A JPEG that already has them is rewritten too: its interval may not tile the rows."""
    mcus = crop_decode.mcus_per_row(jpeg)
    if mcus == 0:
        return jpeg, 0
    rewritten = crop_decode.add_restarts(jpeg, restart_interval(mcus))
    if rewritten is None:
        return jpeg, 1
    before = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_UNCHANGED)
    after = cv2.imdecode(np.frombuffer(rewritten, np.uint8), cv2.IMREAD_UNCHANGED)
    if before is None or after is None or before.shape != after.shape or not np.array_equal(before, after):
        return jpeg, 2
    return rewritten, -1


class Rewritten:
    """The dataset FFCV's writer workers read: each sample's fields in the beton's order, the image as
    (mode, height, width, bytes) for the patched encode below. Never raises (a raise would hang FFCV)."""

    def __init__(self, samples: BetonSamples, image_first: bool, kept, done):
        self.samples, self.image_first, self.kept, self.done = samples, image_first, kept, done

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        samples = self.samples
        data = bytes(samples.encoded(index))
        if samples.mode[index] != MODE_JPEG:   # raw: the pixels only (an allocation may be padded past them)
            data = data[:int(samples.width[index]) * int(samples.height[index]) * 3]
        else:
            data, reason = with_restarts(data)
            if reason >= 0:
                with self.kept[reason].get_lock():
                    self.kept[reason].value += 1
        with self.done.get_lock():
            self.done.value += 1
        image = (int(samples.mode[index]), int(samples.height[index]), int(samples.width[index]),
                 np.frombuffer(data, np.uint8))
        label = int(samples.labels[index])
        return (image, label) if self.image_first else (label, image)


def encode_stored(destination, image, malloc) -> None:
    """RGBImageField.encode for bytes already encoded: FFCV's writer records the field by its class, so the
    image field stays an RGBImageField and only this instance's encode is replaced."""
    mode, height, width, data = image
    destination["mode"], destination["height"], destination["width"] = mode, height, width
    destination["data_ptr"], storage = malloc(data.nbytes)
    storage[:] = data


def rewrite_beton(path: Path, workers: int, console: Console) -> dict:
    """Rewrites `path` in place (atomically); returns how many JPEG samples were rewritten and kept."""
    import ffcv.writer
    from ffcv.reader import Reader

    ffcv.writer.tqdm = functools.partial(ffcv.writer.tqdm, disable=True)   # the progress bar below is ours

    samples = BetonSamples(path)
    fields = read_fields(path)
    handlers = Reader(str(path)).handlers   # the fields as FFCV wrote them, their arguments included
    image_name = next(name for name, kind in fields if kind == IMAGE_FIELD)
    handlers[image_name].encode = encode_stored
    jpegs = int((samples.mode == MODE_JPEG).sum())
    largest = int(samples.size.max(initial=0))
    page = int(read_header(path)["page_size"])
    while page < 4 * largest + 4096:   # room for a sample that grew: a sample over a page hangs FFCV
        page *= 2
    kept = [mp.Value("q", 0) for _ in KEPT_REASONS]
    done = mp.Value("q", 0)
    dataset = Rewritten(samples, fields[0][0] == image_name, kept, done)
    temporary = path.with_name(f".{path.name}.restart.{os.getpid()}.tmp")
    mp.set_start_method("fork", force=True)   # FFCV's workers inherit the dataset and the patched field
    try:
        with make_progress(console) as progress:
            task = progress.add_task(f"restart {path.stem}", total=len(samples))
            writer = ffcv.writer.DatasetWriter(str(temporary), {name: handlers[name] for name, _ in fields},
                                               page_size=page, num_workers=workers)
            finished = threading.Event()

            def follow():
                while not finished.wait(0.2):
                    progress.update(task, completed=done.value)
            watcher = threading.Thread(target=follow, daemon=True)
            watcher.start()
            try:
                writer.from_indexed_dataset(dataset, chunksize=chunk_size(len(samples), workers))
            finally:
                finished.set()
                watcher.join()
            progress.update(task, completed=done.value)
        check = BetonSamples(temporary)
        if len(check) != len(samples) or not np.array_equal(check.labels, samples.labels) \
                or not np.array_equal(check.mode, samples.mode):
            raise ConvertError(f"The rewrite of {path} does not hold the same samples; {path} was left as it was.")
        fsync_file(temporary)
        os.replace(temporary, path)
        fsync_dir(path.parent)
    finally:
        temporary.unlink(missing_ok=True)
    counts = {reason: kept[i].value for i, reason in enumerate(KEPT_REASONS) if kept[i].value}
    return {"jpeg_samples": jpegs, "rewritten": jpegs - sum(counts.values()), "kept": counts}


def restart(data_dir: str | os.PathLike, workers: int | None = None) -> dict:
    """Rewrites every split's beton in DATA_DIR with restart intervals and updates the manifest."""
    if not crop_decode.available():
        raise ConvertError(f"`convert restart` needs the native crop decoder: {crop_decode.MISSING}.")
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    workers = workers or os.cpu_count() or 1
    console = Console(stderr=True, soft_wrap=True)
    report = {}
    infos = {split: split_info(manifest, split, data_dir) for split in manifest.get("splits", {})}
    paths = {split: data_dir / info.get("beton", f"{split}.beton") for split, info in infos.items()}
    for split, path in paths.items():   # all there before any is rewritten
        if not path.is_file():
            raise ConvertError(f"{path} (the {split} beton the manifest names) does not exist.")
    for split, path in paths.items():
        info = infos[split]
        before = path.stat().st_size
        found = rewrite_beton(path, workers, console)
        info["size_bytes"], info["sha256"] = path.stat().st_size, sha256_file(path)
        info.setdefault("settings", {})["restart_intervals"] = True
        # the manifest follows each beton as it is replaced: an interrupted run leaves them in step
        write_json_atomic(data_dir / "manifest.json", manifest)
        found["bytes_before"], found["bytes_after"] = before, info["size_bytes"]
        report[split] = found
        kept = "; ".join(f"{count} kept as they were: {reason}" for reason, count in found["kept"].items())
        console.print(f"{split}: {found['rewritten']} of {found['jpeg_samples']} JPEG samples now have restart "
                      f"intervals; beton {before:,} -> {info['size_bytes']:,} bytes" + (f" ({kept})" if kept else ""))
    return report
