"""Samples that live inside archives: a `Member` is a byte range of an uncompressed tar (nested tars included)
that the converter's workers read in place with one positioned read, so an archive is never extracted.

Scanning reads only the tar headers (tarfile seeks over the data), which is what makes a 1.28M-member
ImageNet train archive a list of offsets in one pass. Compressed tars have no such offsets: they are refused
with the command that makes them usable.
"""
from __future__ import annotations

import glob
import os
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from braceexpand import braceexpand

from convert.sources import ConvertError


@dataclass(frozen=True, order=True)   # ordered: archive order (file, then offset)
class Member:
    """`size` bytes at `offset` of `file`; `name` is how the manifest and the bad-file report call it."""
    file: str
    offset: int
    size: int
    name: str

    def read_bytes(self) -> bytes:
        with open(self.file, "rb") as handle:
            data = os.pread(handle.fileno(), self.size, self.offset)
        if len(data) != self.size:
            raise OSError(f"{self.file} ends before {self.name} does (truncated archive)")
        return data

    def __str__(self) -> str:
        return f"{self.file}:{self.name}"


def open_tar(path: Path) -> tarfile.TarFile:
    """An uncompressed tar opened for header scans; a clear error for anything else."""
    if not path.is_file():
        raise ConvertError(f"Archive {path} does not exist." if not path.exists() else f"{path} is not a file.")
    try:
        return tarfile.open(path, "r:")
    except tarfile.CompressionError as err:
        raise ConvertError(f"{path} is compressed ({err}); samples are read in place, which needs an uncompressed "
                           f"tar: decompress it first (e.g. `gunzip -k {path}`).") from err
    except tarfile.ReadError as err:
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic[:2] == b"\x1f\x8b" or magic[:3] in (b"BZh", b"\xfd7z"):
            raise ConvertError(f"{path} is a compressed tar; samples are read in place, which needs an "
                               f"uncompressed one: decompress it first (e.g. `gunzip -k {path}`).") from err
        raise ConvertError(f"{path} is not a readable tar archive ({err}).") from err


class ScanProgress:
    """A progress bar over the bytes of the archives being scanned (MB/s and ETA): a scan of ImageNet's
    140 GB train tar reads 1.28M headers spread over the whole file, minutes on a network filesystem."""

    def __init__(self, progress, paths: list[Path], what: str):
        self.progress, self.seen = progress, {}
        total = sum(path.stat().st_size for path in paths if path.is_file())
        self.task = progress.add_task(f"scan {what}", total=total) if progress is not None else None

    def at(self, path: Path, position: int) -> None:
        if self.task is not None:
            delta, self.seen[path] = position - self.seen.get(path, 0), position
            self.progress.advance(self.task, delta)


@contextmanager
def scan_progress(console, paths: list[Path], what: str) -> Iterator[ScanProgress]:
    """A ScanProgress shown on `console` (none when it is None) while the block runs."""
    if console is None:
        yield ScanProgress(None, paths, what)
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(TextColumn("{task.description:<15}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), console=console) as progress:
        yield ScanProgress(progress, paths, what)


def unreadable(info: tarfile.TarInfo) -> str:
    """Why a member scan_tar yields without a Member cannot be read in place."""
    if info.islnk() or info.issym():
        return f"a link to {info.linkname}, not the file itself: the archive must hold the sample's bytes"
    return "stored sparse: cannot be read in place"


def ends_cleanly(archive: tarfile.TarFile, size: int) -> bool:
    """Whether the member list ended at the tar's end-of-archive block. tarfile also ends it, silently, at a
    header it cannot read (a corrupt one, or a file cut at or inside one), which would lose every later member."""
    if archive.offset + tarfile.BLOCKSIZE > size:
        return False
    archive.fileobj.seek(archive.offset)
    return archive.fileobj.read(tarfile.BLOCKSIZE) == bytes(tarfile.BLOCKSIZE)


def scan_tar(path: Path, prefix: str = "", progress: ScanProgress | None = None,
             ) -> Iterator[tuple[Member | None, tarfile.TarInfo]]:
    """(Member, its TarInfo) for every regular file and link of the tar at `path`, in archive order (Member
    None when the data is not stored there in one piece: `unreadable` says why). A truncated or corrupt
    archive raises ConvertError naming it and the last member read: tarfile takes a file cut inside a
    member's data, at a header or inside one, and a corrupt header for the end of the archive, so the last
    member's end is checked against the file's size and the end against the end-of-archive block.
    `progress` hears each member's end."""
    last, end, size = "(none)", 0, path.stat().st_size if path.is_file() else 0
    with open_tar(path) as archive:
        try:
            for info in archive:
                if info.islnk() or info.issym():
                    yield None, info
                    continue
                if not info.isfile():
                    continue
                last, end = info.name, info.offset_data + info.size
                if end > size:
                    break
                if progress is not None:
                    progress.at(path, end)
                whole = info.sparse is None
                yield (Member(str(path), info.offset_data, info.size, prefix + info.name) if whole else None), info
            clean = end > size or ends_cleanly(archive, size)
        except (tarfile.ReadError, EOFError, OSError) as err:
            raise ConvertError(f"{path} is truncated or corrupt after member {last} ({err}); download it "
                               f"again (nothing was written).") from err
    if not clean:
        raise ConvertError(f"{path} is truncated or corrupt after member {last}: no readable header and no "
                           f"end-of-archive block follows it; download it again (nothing was written).")
    if end > size:
        raise ConvertError(f"{path} is truncated: member {last} ends at byte {end:,}, the file at {size:,}; "
                           f"download it again (nothing was written).")


def nested_members(archive_path: Path, info: tarfile.TarInfo) -> tuple[list[Member], list[dict]]:
    """The files of a tar stored uncompressed inside the tar at `archive_path` (ImageNet's per-synset tars),
    as Members of the outer file (their offsets are the inner member's plus the inner tar's own), and the
    entries that cannot be read in place, with the reason."""
    members, skipped = [], []
    try:
        with open_tar(archive_path) as outer, tarfile.open(fileobj=outer.extractfile(info), mode="r:") as inner:
            for entry in inner:
                name = f"{Path(info.name).stem}/{entry.name}"
                if entry.isfile() and entry.sparse is None:
                    members.append(Member(str(archive_path), info.offset_data + entry.offset_data, entry.size,
                                          name))
                elif entry.isfile() or entry.islnk() or entry.issym():
                    skipped.append({"path": name, "reason": unreadable(entry)})
            if not ends_cleanly(inner, info.size):
                last = members[-1].name if members else "(none)"
                raise tarfile.ReadError(f"no readable header and no end-of-archive block after {last}")
    except (tarfile.ReadError, EOFError, OSError) as err:
        raise ConvertError(f"{info.name} inside {archive_path} is not a readable tar ({err}); the archive is "
                           f"damaged: download it again (nothing was written).") from err
    return members, skipped


def expand_pattern(pattern: str, what: str) -> list[Path]:
    """Brace patterns (`train-{000000..000127}.tar`, as WebDataset writes them) and globs, in order, each
    file once; an empty result or a missing file is an error that names the pattern."""
    paths: list[Path] = []
    for expanded in braceexpand(pattern):
        matches = sorted(glob.glob(os.path.expanduser(expanded))) if glob.has_magic(expanded) else [expanded]
        for match in matches:
            path = Path(match).expanduser().resolve()
            if not path.is_file():
                raise ConvertError(f"{what}: {match} (from {pattern!r}) does not exist.")
            if path not in paths:
                paths.append(path)
    if not paths:
        raise ConvertError(f"{what}: no file matches {pattern!r}.")
    return paths
