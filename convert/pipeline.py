"""Folder in, betons out: validate every file in a process pool, write the betons, record the manifest.

Betons are written under temporary names and moved into place only when complete; the manifest,
written last, also stores an input fingerprint so that an identical re-run is a no-op.
"""
from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import psutil
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from convert.sources import LOOSE_REASON, ConvertError, Source
from convert.validate import BadImage, check_image
from convert.write import BetonJob, WriterProcess, WriteSettings, die_with_parent, process_context
from fastpipe.data.beton import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    BetonError,
    check_beton,
    fsync_dir,
    fsync_file,
    read_manifest,
    sha256_file,
    write_json_atomic,
)
from fastpipe.data.sample_table import SampleTable, write_sample_table
from fastpipe.versions import package_versions

SPLITS = ("train", "val")
SHOWN_REASONS = 5


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} img/s" if speed else "- img/s", style="cyan")


def make_progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description:<15}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=console)


def tool_versions() -> dict:
    return package_versions({name: name for name in ("ffcv", "numpy", "pillow", "torch", "fastpipe")})


def settings_record(settings: WriteSettings) -> dict:
    return {"write_mode": settings.write_mode, "max_resolution": settings.max_resolution,
            "jpeg_quality": settings.jpeg_quality, "compress_probability": settings.compress_probability,
            "seed": settings.seed, "smart_threshold": settings.smart_threshold, "min_side": settings.min_side,
            "restart_intervals": settings.restart_intervals}


def fingerprint(source: Source, settings: dict[str, WriteSettings]) -> str:
    """Hash of what decides the output: every file's path, label, size and mtime, and the options."""
    digest = hashlib.sha256()
    header = {"format": MANIFEST_FORMAT, "root": str(source.root), "layout": source.layout,
              "classes": source.classes, "settings": {k: settings_record(v) for k, v in settings.items()},
              "left_out": source.skipped,
              "ffcv": tool_versions()["ffcv"]}
    digest.update(json.dumps(header, sort_keys=True).encode())
    archives: dict[str, os.stat_result] = {}   # an archive's size and time stand for its members'
    for split, items in source.splits.items():
        for path, label in items:
            if archived(path):
                stat = archives.get(path.file) or archives.setdefault(path.file, os.stat(path.file))
                where = repr(path)
            else:
                stat, where = path.stat(), str(path)
            digest.update(f"{split}\0{where}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
                          .encode(errors="surrogateescape"))   # file names in another encoding: their bytes
    for split, paths in source.loose.items():   # they are listed in the manifest, so they count too
        digest.update("".join(f"loose\0{split}\0{path}\n" for path in paths).encode(errors="surrogateescape"))
    return digest.hexdigest()


def up_to_date(out: Path, digest: str) -> dict | None:
    """The existing manifest when it was written from the same inputs and options and its betons check out."""
    try:
        manifest = read_manifest(out)
        if manifest.get("fingerprint") != digest:
            return None
        for split in SPLITS:
            check_beton(out, split, manifest)
            SampleTable(out, manifest, split).names_path()   # the per-sample tables are outputs too
    except BetonError:
        return None
    return manifest


def archived(sample) -> bool:
    """A sample inside an archive or a parquet file (convert.members.Member, convert.parquet.ParquetRow: they
    have `file`, `name` and `read_bytes()`), not a file of its own."""
    return not isinstance(sample, (str, os.PathLike))


def sample_name(sample, root: Path) -> str:
    """How the manifest and the bad-file report name a sample: its path under the source folder, or its
    name inside the archive."""
    return sample.name if archived(sample) else Path(sample).relative_to(root).as_posix()


def _check_one(job: tuple) -> tuple:
    path, max_resolution, min_side = job
    try:
        result = check_image(path, max_resolution, min_side)
    except BadImage as err:
        return False, str(err)
    return True, (result.width, result.height)


def _init_pool_worker() -> None:
    import cv2  # in the worker only: the parent never decodes

    cv2.setNumThreads(1)
    die_with_parent()


def validate_split(pool, items: list[tuple[Path, int]], settings: WriteSettings, strict: bool, root: Path,
                   advance) -> tuple[list[tuple[str, int, int, int]], list[dict]]:
    """Check every file (or archive member) in the pool, in order. Returns the good samples (path or
    Member, label, width, height) and the skipped ones as {path, reason}; with `strict`, the first bad one
    is an error."""
    jobs = [(path if archived(path) else str(path), settings.max_resolution, settings.min_side)
            for path, _ in items]
    results = pool.imap(_check_one, jobs, chunksize=8) if pool else map(_check_one, jobs)
    good, skipped = [], []
    for (path, label), (ok, detail) in zip(items, results):
        if ok:
            good.append((path if archived(path) else str(path), label, *detail))
        else:
            if strict:
                raise ConvertError(f"Bad image {path}: {detail}. (--strict stops at the first bad file; "
                                   f"without it, bad files are skipped and listed in the manifest.)")
            skipped.append({"path": sample_name(path, root), "reason": detail})
        advance()
    return good, skipped


def image_stats(items: list[tuple[str, int, int, int]]) -> dict:
    widths = [width for _, _, width, _ in items]
    heights = [height for _, _, _, height in items]
    return {"min_side": min(map(min, zip(widths, heights))), "max_side": max(map(max, zip(widths, heights))),
            "mean_width": round(sum(widths) / len(widths), 1), "mean_height": round(sum(heights) / len(heights), 1)}


def _remove_stale_temporaries(out: Path) -> None:
    for path in out.glob(".*.beton.*.tmp"):
        pid = path.name.rsplit(".", 2)[-2]
        if not (pid.isdigit() and psutil.pid_exists(int(pid))):
            path.unlink(missing_ok=True)
    for pattern in (".*.samples.npy.*.tmp", ".*.names.bin.*.tmp"):   # sample tables a killed run left
        for path in out.glob(pattern):
            path.unlink(missing_ok=True)


def convert_source(source: Source, out: str | os.PathLike, train: WriteSettings, val: WriteSettings,
                   workers: int | None = None, strict: bool = False, force: bool = False,
                   stall_timeout: float = 300.0, console: Console | None = None) -> dict:
    """Write OUT/train.beton, OUT/val.beton and OUT/manifest.json for `source`; returns the manifest.

    Worker processes start from a forkserver, which re-imports the caller's main script: call this
    from under `if __name__ == "__main__":` in scripts (the CLI, pytest and benchmarks already are)."""
    console = console or Console(stderr=True, soft_wrap=True)
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    settings = {"train": train, "val": val}
    digest = fingerprint(source, settings)
    if not force and (existing := up_to_date(out, digest)):
        console.print(f"Up to date: {out} already holds betons for these inputs and options; nothing to do "
                      f"(use --force to rewrite).")
        return existing
    if strict and (left_out := [item for items in source.skipped.values() for item in items]):
        raise ConvertError(f"Bad sample {left_out[0]['path']}: {left_out[0]['reason']}. (--strict stops at the first "
                           f"bad sample; without it, bad samples are skipped and listed in the manifest.)")
    _remove_stale_temporaries(out)
    temporaries = {split: out / f".{split}.beton.{os.getpid()}.tmp" for split in SPLITS}
    splits = {}
    pool = process_context().Pool(workers, initializer=_init_pool_worker) if workers > 1 else None
    try:
        with WriterProcess(workers) as writer, make_progress(console) as progress:
            jobs = []
            for split in SPLITS:
                items = source.splits[split]
                task = progress.add_task(f"check {split}", total=len(items))
                good, skipped = validate_split(pool, items, settings[split], strict, source.root,
                                               lambda task=task: progress.advance(task))
                if not good:
                    reasons = "; ".join(f"{item['path']}: {item['reason']}" for item in skipped[:3])
                    raise ConvertError(f"No usable images in the {split} split of {source.root} "
                                       f"({len(skipped)} skipped, e.g. {reasons}).")
                loose = [{"path": path.relative_to(source.root).as_posix(), "reason": LOOSE_REASON}
                         for path in source.loose.get(split, [])]
                splits[split] = {"good": good, "skipped": loose + source.skipped.get(split, []) + skipped}
                jobs.append(BetonJob(split, temporaries[split], good, settings[split]))
            if pool:
                pool.close()
            tasks = [progress.add_task(f"write {job.split}", total=len(job.items)) for job in jobs]
            writer.write(jobs, stall_timeout,
                         on_progress=lambda index, done: progress.update(tasks[index], completed=done))
        manifest = {"format": MANIFEST_FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "source_root": str(source.root), "layout": source.layout, "classes": source.classes,
                    "splits": {}, "versions": tool_versions(), "fingerprint": digest}
        # Never pair new betons or sample tables with an old manifest: from here to the new one there is none.
        (out / MANIFEST_NAME).unlink(missing_ok=True)
        for split in SPLITS:
            good, path = splits[split]["good"], temporaries[split]
            manifest["splits"][split] = {
                "beton": f"{split}.beton", "written": len(good), "skipped": splits[split]["skipped"],
                "size_bytes": path.stat().st_size, "sha256": sha256_file(path),
                "sample_table": write_sample_table(out, split, [sample_name(file, source.root) for file, *_ in good],
                                                   [label for _, label, _, _ in good],
                                                   [width for *_, width, _ in good], [height for *_, height in good]),
                "settings": settings_record(settings[split]), "image_stats": image_stats(good)}
        for path in temporaries.values():
            fsync_file(path)
        for split in SPLITS:
            os.replace(temporaries[split], out / f"{split}.beton")
        fsync_dir(out)
        write_json_atomic(out / MANIFEST_NAME, manifest)
    finally:
        if pool:
            pool.terminate()
        for path in temporaries.values():
            path.unlink(missing_ok=True)
    print_summary(manifest, console)
    return manifest


def print_summary(manifest: dict, console: Console) -> None:
    for split in SPLITS:
        info = manifest["splits"][split]
        console.print(f"{split}: written {info['written']}, skipped {len(info['skipped'])}")
        for item in info["skipped"][:SHOWN_REASONS]:
            console.print(f"  skipped {item['path']}: {item['reason']}", markup=False, highlight=False)
        if len(info["skipped"]) > SHOWN_REASONS:
            console.print(f"  ... and {len(info['skipped']) - SHOWN_REASONS} more (see manifest.json)")
