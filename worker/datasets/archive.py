"""Safe extraction of zip and tar archives (tar, tar.gz, tar.bz2, tar.xz), limits enforced while streaming.

Nothing in an uploaded archive is trusted. Entry names are checked before anything is written
(no `..`, absolute paths, drive letters, backslashes, NUL or control characters); links, device
files, FIFOs and nested archives are refused; files are created with O_EXCL|O_NOFOLLOW strictly
under the destination. The bytes actually decompressed are counted as they stream (tar headers
included) and reading stops at the first limit: total bytes, entry count, compression ratio.
Declared sizes are never used to decide what is safe. Entry problems are collected (every one is
reported); limits and corrupt data stop at once. On any refusal the destination is removed.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import os
import re
import shutil
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .limits import DatasetLimits
from .problems import ArchiveRefused, Problem, ProblemList, ValidationCancelled, problem

ProgressFn = Callable[[int, int | None, str], None]
StopFn = Callable[[], bool]

CHUNK = 1 << 20
# Inner archives are refused by name here, and by content when the images are checked.
NESTED_ARCHIVE_SUFFIXES = (
    ".zip", ".tar", ".gz", ".tgz", ".bz2", ".tbz", ".tbz2", ".xz", ".txz",
    ".7z", ".rar", ".zst", ".lz", ".lzma", ".z", ".cab", ".iso",
)  # fmt: skip
# Files that archiving tools add on their own: skipped, not extracted, listed as ignored.
JUNK_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini"})
_DRIVE = re.compile(r"^[A-Za-z]:")
_ZIP_METHODS = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA})
# tarfile reads ahead in records of 20 blocks; the header ceiling allows for that.
_TAR_SLACK = 64 << 10


def archive_kind(path: str | os.PathLike[str]) -> str | None:
    """'zip' or 'tar' (plain or gzip/bzip2/xz-compressed) from the file's content, else None."""
    with open(path, "rb") as fh:
        head = fh.read(512)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")) or head[257:262] == b"ustar":
        return "tar"
    return None


@dataclass
class Extracted:
    """What an extraction wrote: relative POSIX paths of the files, and what it skipped."""

    root: Path
    files: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    entries: int = 0
    bytes: int = 0


class _Fatal(Exception):
    """A limit or corrupt data: stop reading the archive now."""

    def __init__(self, item: Problem) -> None:
        super().__init__(item.message)
        self.problem = item


class _CountingFile:
    """The archive file, counting the (compressed) bytes read from it."""

    def __init__(self, fh) -> None:
        self._fh = fh
        self.bytes_read = 0

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        self.bytes_read += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


class _Meter:
    """Counts decompressed bytes against the total, ratio and (tar) header limits; reports progress."""

    def __init__(
        self,
        limits: DatasetLimits,
        raw: _CountingFile,
        archive_size: int,
        on_progress: ProgressFn | None,
        should_stop: StopFn | None,
    ) -> None:
        self.limits = limits
        self.raw = raw
        self.archive_size = archive_size
        self.on_progress = on_progress
        self.should_stop = should_stop
        self.decompressed = 0
        self.ceiling: int | None = None

    def check_stop(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise ValidationCancelled("stopped while extracting")

    def progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress(min(self.raw.bytes_read, self.archive_size), self.archive_size, "extracting")

    def out(self, n: int) -> None:
        self.decompressed += n
        limits = self.limits
        if self.decompressed > limits.max_total_bytes:
            raise _Fatal(
                problem(
                    "",
                    "too_large",
                    f"the archive holds more than {limits.max_total_bytes:,} bytes uncompressed "
                    f"(the limit); extraction stopped there",
                )
            )
        compressed = max(1, min(self.raw.bytes_read, self.archive_size))
        if (
            self.decompressed > limits.ratio_grace_bytes
            and self.decompressed > limits.max_compression_ratio * compressed
        ):
            raise _Fatal(
                problem(
                    "",
                    "compression_ratio",
                    f"{compressed:,} compressed bytes expanded to {self.decompressed:,} "
                    f"(more than {limits.max_compression_ratio:g}x): refused as a possible zip bomb",
                )
            )
        if self.ceiling is not None and self.decompressed > self.ceiling:
            raise _Fatal(
                problem(
                    "",
                    "header_too_large",
                    f"an entry header is larger than {limits.max_header_bytes:,} bytes "
                    "(malformed or hostile archive)",
                )
            )


class _MeteredReader:
    """A decompressed stream whose every byte goes through the meter (tar headers included)."""

    def __init__(self, stream, meter: _Meter) -> None:
        self._stream = stream
        self._meter = meter

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(CHUNK if n is None or n < 0 else min(n, CHUNK))
        self._meter.out(len(data))
        return data


def _printable(name: str) -> str:
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in name)


class _Extractor:
    def __init__(self, dest: Path, limits: DatasetLimits, meter: _Meter) -> None:
        self.dest = dest
        self.real_dest = os.path.realpath(dest)
        self.limits = limits
        self.meter = meter
        self.problems = ProblemList(limits.max_problems)
        self.result = Extracted(root=dest)
        self.files: set[str] = set()
        self.dirs: set[str] = set()

    # ---------------------------------------------------------------- entries

    def count_entry(self) -> None:
        self.meter.check_stop()
        self.result.entries += 1
        if self.result.entries > self.limits.max_files:
            raise _Fatal(
                problem(
                    "",
                    "too_many_files",
                    f"the archive has more than {self.limits.max_files:,} entries (the limit); "
                    f"reading stopped at entry {self.result.entries:,}",
                )
            )
        self.meter.progress()

    def safe_parts(self, raw: str) -> tuple[str, ...] | None:
        """The normalized path parts of an entry name, or None (and a problem) if it is unsafe."""
        shown = _printable(raw)
        reason = None
        if "\x00" in raw:
            reason = "contains a NUL byte"
        elif any(ord(c) < 32 or ord(c) == 127 for c in raw):
            reason = "contains control characters"
        elif "\\" in raw:
            reason = "contains a backslash (a Windows path separator, refused)"
        elif raw.startswith("/"):
            reason = "is an absolute path"
        elif _DRIVE.match(raw):
            reason = "starts with a drive letter"
        parts = tuple(p for p in raw.split("/") if p not in ("", "."))
        if reason is None and ".." in parts:
            reason = "leaves the destination folder ('..')"
        if reason is not None:
            self.problems.add(problem(shown, "unsafe_path", f"unsafe entry name {shown!r}: {reason}"))
            return None
        if len(raw) > self.limits.max_path_length or any(len(p.encode()) > 255 for p in parts):
            self.problems.add(
                problem(
                    shown[:200],
                    "path_too_long",
                    f"path is longer than {self.limits.max_path_length} characters "
                    "(or has a name over 255 bytes)",
                )
            )
            return None
        if len(parts) > self.limits.max_path_depth:
            self.problems.add(
                problem(
                    shown,
                    "path_too_long",
                    f"path is {len(parts)} folders deep (limit {self.limits.max_path_depth})",
                )
            )
            return None
        return parts

    def is_junk(self, parts: tuple[str, ...]) -> bool:
        """Hidden files and folders, macOS resource forks, Windows thumbnails: skipped, listed."""
        if parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts) or parts[-1].lower() in JUNK_NAMES:
            if len(self.result.ignored) < 100:
                self.result.ignored.append("/".join(parts))
            return True
        return False

    def add_dir(self, parts: tuple[str, ...]) -> None:
        rel = "/".join(parts)
        if rel in self.files:
            self.problems.add(problem(rel, "duplicate_entry", "is both a file and a folder in the archive"))
            return
        if rel not in self.dirs:
            self.dirs.add(rel)
            (self.dest / rel).mkdir(parents=True, exist_ok=True)

    def claim_file(self, parts: tuple[str, ...]) -> str | None:
        """The relative path a regular file may be written to, or None (and a problem)."""
        rel = "/".join(parts)
        if parts[-1].lower().endswith(NESTED_ARCHIVE_SUFFIXES):
            self.problems.add(
                problem(rel, "nested_archive", "is an archive inside the archive (not extracted)")
            )
            return None
        parents = ["/".join(parts[:i]) for i in range(1, len(parts))]
        if rel in self.files:
            self.problems.add(problem(rel, "duplicate_entry", "appears more than once in the archive"))
            return None
        if rel in self.dirs or any(p in self.files for p in parents):
            self.problems.add(problem(rel, "duplicate_entry", "is both a file and a folder in the archive"))
            return None
        self.files.add(rel)
        self.dirs.update(parents)
        return rel

    def write(self, rel: str, read: Callable[[int], bytes], *, count_bytes: bool) -> None:
        """Stream one file to dest/rel in chunks; `count_bytes` when the reader is not metered."""
        target = self.dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        # Defence in depth: nothing here creates links, so the parent must resolve inside dest.
        parent = os.path.realpath(target.parent)
        if os.path.commonpath([parent, self.real_dest]) != self.real_dest:
            raise _Fatal(problem(rel, "unsafe_path", f"{rel!r} would be written outside the dataset folder"))
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(target, flags, 0o644)
        with os.fdopen(fd, "wb") as out:
            while True:
                self.meter.check_stop()
                chunk = read(CHUNK)
                if not chunk:
                    break
                if count_bytes:
                    self.meter.out(len(chunk))
                out.write(chunk)
                self.result.bytes += len(chunk)
                self.meter.progress()
        self.result.files.append(rel)

    # ---------------------------------------------------------------- zip

    def zip_prescan(self, fh, size: int) -> None:
        """Refuse too many entries from the end record, then by walking the central directory up to
        the limit (the declared count may lie), before zipfile parses the whole directory."""
        tail_len = min(size, 22 + 0xFFFF)
        fh.seek(size - tail_len)
        tail = fh.read(tail_len)
        pos = tail.rfind(b"PK\x05\x06")
        if pos < 0 or len(tail) - pos < 22:
            raise _Fatal(
                problem("", "corrupt_archive", "not a complete zip file (no end of central directory)")
            )
        _, _, _, _, count, cd_size, cd_offset, _ = struct.unpack("<4s4H2LH", tail[pos : pos + 22])
        eocd_at = size - tail_len + pos
        cd_end = eocd_at
        if (count == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF) and pos >= 20:
            sig, _, eocd64_at, _ = struct.unpack("<4sLQL", tail[pos - 20 : pos])
            if sig == b"PK\x06\x07" and eocd64_at + 56 <= size:
                fh.seek(eocd64_at)
                record = fh.read(56)
                if record[:4] == b"PK\x06\x06":
                    count, _, cd_size, cd_offset = struct.unpack("<2Q2Q", record[24:56])
                    cd_end = eocd64_at
        if count > self.limits.max_files:
            raise _Fatal(
                problem(
                    "",
                    "too_many_files",
                    f"the archive declares {count:,} entries; the limit is {self.limits.max_files:,}",
                )
            )
        start = cd_end - cd_size
        if start < 0:
            return  # zipfile reports the inconsistency
        fh.seek(start)
        buffer = b""
        left = cd_size
        walked = 0
        while True:
            if len(buffer) < 46 and left:
                chunk = fh.read(min(CHUNK, left))
                left -= len(chunk)
                buffer += chunk
            if len(buffer) < 46 or buffer[:4] != b"PK\x01\x02":
                return
            name_len, extra_len, comment_len = struct.unpack("<3H", buffer[28:34])
            record = 46 + name_len + extra_len + comment_len
            while len(buffer) < record and left:
                chunk = fh.read(min(CHUNK, left))
                left -= len(chunk)
                buffer += chunk
            buffer = buffer[record:]
            walked += 1
            if walked > self.limits.max_files:
                raise _Fatal(
                    problem(
                        "",
                        "too_many_files",
                        f"the archive has more than {self.limits.max_files:,} entries (the limit); "
                        f"reading stopped at entry {walked:,}",
                    )
                )

    def extract_zip(self, raw: _CountingFile, size: int) -> None:
        self.zip_prescan(raw, size)
        with zipfile.ZipFile(raw) as archive:
            raw.bytes_read = 0  # from here on, only member reads count as compressed input
            offsets: set[int] = set()
            for info in archive.infolist():
                self.count_entry()
                parts = self.safe_parts(info.orig_filename)
                if not parts:
                    continue
                rel = "/".join(parts)
                kind = stat.S_IFMT(info.external_attr >> 16)
                if stat.S_ISLNK(info.external_attr >> 16):
                    self.problems.add(problem(rel, "link_entry", "is a symbolic link (not extracted)"))
                    continue
                if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                    self.problems.add(problem(rel, "special_file", "is a device file, FIFO or socket"))
                    continue
                if self.is_junk(parts):
                    continue
                if info.is_dir() or kind == stat.S_IFDIR:
                    self.add_dir(parts)
                    continue
                if info.flag_bits & 0x1:
                    self.problems.add(problem(rel, "encrypted_entry", "is encrypted (password-protected)"))
                    continue
                if info.compress_type not in _ZIP_METHODS:
                    self.problems.add(
                        problem(
                            rel,
                            "unsupported_compression",
                            f"uses zip compression method {info.compress_type}, which is not supported",
                        )
                    )
                    continue
                target = self.claim_file(parts)
                if target is None:
                    continue
                if info.header_offset in offsets:
                    raise _Fatal(
                        problem(
                            rel, "corrupt_archive", "shares its data with another entry (overlapping entries)"
                        )
                    )
                offsets.add(info.header_offset)
                with self._zip_member(archive, info, rel) as member:
                    self.write(target, _reading(member.read, rel), count_bytes=True)

    @staticmethod
    @contextlib.contextmanager
    def _zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, rel: str):
        try:
            member = archive.open(info)
        except (zipfile.BadZipFile, NotImplementedError, OSError, EOFError) as exc:
            raise _Fatal(problem(rel, "corrupt_archive", f"cannot be extracted: {exc}")) from exc
        with member:
            yield member

    # ---------------------------------------------------------------- tar

    def extract_tar(self, raw: _CountingFile) -> None:
        head = raw.read(6)
        raw.seek(0)
        raw.bytes_read = 0
        opener = {b"\x1f\x8b": _gunzip, b"BZh": bz2.BZ2File, b"\xfd7zXZ": lzma.LZMAFile}
        decompress = next((fn for magic, fn in opener.items() if head.startswith(magic)), None)
        with contextlib.ExitStack() as stack:
            stream = stack.enter_context(decompress(raw, mode="rb")) if decompress else raw
            self._read_tar(stream)

    def _read_tar(self, stream) -> None:
        meter = self.meter
        limit_headers = self.limits.max_header_bytes + _TAR_SLACK
        meter.ceiling = limit_headers
        with tarfile.open(fileobj=_MeteredReader(stream, meter), mode="r|") as archive:
            while True:
                member = archive.next()
                if member is None:
                    break
                # Stream mode keeps every member seen; nothing here needs them again.
                archive.members.clear()
                meter.ceiling = meter.decompressed + _padded(member.size) + limit_headers
                self.count_entry()
                parts = self.safe_parts(member.name)
                if not parts:
                    continue
                rel = "/".join(parts)
                if member.issym() or member.islnk():
                    kind = "symbolic" if member.issym() else "hard"
                    self.problems.add(
                        problem(rel, "link_entry", f"is a {kind} link to {_printable(member.linkname)!r}")
                    )
                    continue
                if member.ischr() or member.isblk() or member.isfifo():
                    self.problems.add(problem(rel, "special_file", "is a device file or FIFO"))
                    continue
                if not (member.isdir() or member.type in (tarfile.REGTYPE, tarfile.AREGTYPE)):
                    self.problems.add(
                        problem(rel, "special_file", f"has an unsupported tar entry type {member.type!r}")
                    )
                    continue
                if self.is_junk(parts):
                    continue
                if member.isdir():
                    self.add_dir(parts)
                    continue
                target = self.claim_file(parts)
                if target is None:
                    continue
                data = archive.extractfile(member)
                self.write(target, data.read, count_bytes=False)


def _reading(read: Callable[[int], bytes], rel: str) -> Callable[[int], bytes]:
    """`read`, with decompression and CRC errors turned into a refusal naming the entry (errors
    writing to our own disk are not the archive's fault and are left to propagate)."""

    def checked(n: int) -> bytes:
        try:
            return read(n)
        except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError) as exc:
            raise _Fatal(problem(rel, "corrupt_archive", f"cannot be extracted: {exc}")) from exc

    return checked


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def extract_archive(
    archive: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    limits: DatasetLimits | None = None,
    *,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> Extracted:
    """Extract a zip or tar archive into `dest` (created; must not exist or be empty).

    Raises `ArchiveRefused` with every problem found (entry problems are all collected; a limit
    or corrupt data stops reading at once), or `ValidationCancelled` when `should_stop()` turns
    true. In both cases `dest` has been removed. Progress is `on_progress(bytes_read,
    archive_size, "extracting")`.
    """
    limits = limits or DatasetLimits()
    source = Path(archive)
    target = Path(dest)
    if target.exists() and any(target.iterdir()):
        raise ValueError(f"{target} is not empty")
    kind = archive_kind(source)
    if kind is None:
        raise ArchiveRefused([problem("", "unsupported_upload", "the upload is not a zip or tar archive")])
    target.mkdir(parents=True, exist_ok=True)
    size = source.stat().st_size
    try:
        with open(source, "rb") as fh:
            raw = _CountingFile(fh)
            meter = _Meter(limits, raw, size, on_progress, should_stop)
            extractor = _Extractor(target, limits, meter)
            try:
                if kind == "zip":
                    extractor.extract_zip(raw, size)
                else:
                    extractor.extract_tar(raw)
            except _Fatal as exc:
                extractor.problems.add(exc.problem)
                raise ArchiveRefused(extractor.problems.final()) from None
            except (zipfile.BadZipFile, tarfile.TarError, zlib.error, lzma.LZMAError, EOFError) as exc:
                extractor.problems.add(problem("", "corrupt_archive", f"the archive is damaged ({exc})"))
                raise ArchiveRefused(extractor.problems.final()) from None
            except OSError as exc:
                if isinstance(exc, gzip.BadGzipFile) or "Invalid data stream" in str(exc):
                    extractor.problems.add(problem("", "corrupt_archive", f"the archive is damaged ({exc})"))
                    raise ArchiveRefused(extractor.problems.final()) from None
                raise
            if extractor.problems:
                raise ArchiveRefused(extractor.problems.final())
            meter.progress()
            return extractor.result
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise


def _gunzip(raw: _CountingFile, mode: str) -> gzip.GzipFile:
    return gzip.GzipFile(fileobj=raw, mode=mode)
