"""Hostile and broken archives: refused with every problem named, nothing written outside, nothing left."""

from __future__ import annotations

import re
import stat
import struct
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from worker.datasets import ArchiveRefused, DatasetLimits, extract_archive

from .builders import (
    codes,
    good_entries,
    image_bytes,
    patch_bytes,
    tar_gz_of_many_entries,
    tar_member,
    tree,
    write_tar,
    write_zip,
    zip_with_info,
)

SLIP_NAMES = {
    "../../evil_parent.png": "leaves the destination folder",
    "cat/../../../../../../evil_far.png": "leaves the destination folder",
    "..\\..\\evil_backslash.png": "backslash",
    "C:/evil_drive.png": "drive letter",
    "C:\\evil_drive2.png": "backslash",
}


def _slip_entries(tmp_path: Path) -> dict[str, str]:
    names = dict(SLIP_NAMES)
    names[f"{tmp_path}/evil_absolute.png"] = "absolute path"
    return names


@pytest.mark.parametrize("kind", ["zip", "tar.gz", "tar"])
def test_path_traversal_entries_are_all_refused_and_nothing_escapes(
    sandbox, tmp_path: Path, kind: str
) -> None:
    slips = _slip_entries(tmp_path)
    entries = {**good_entries(), **{name: image_bytes() for name in slips}}
    upload = sandbox.upload_dir / f"slip.{kind}"
    if kind == "zip":
        write_zip(upload, entries)
    else:
        write_tar(upload, entries, mode="w:gz" if kind == "tar.gz" else "w")

    report = sandbox.validate(upload)

    assert report.status == "invalid"
    found = {p.path: p for p in report.problems}
    for name, reason in slips.items():
        assert found[name].code == "unsafe_path", found[name]
        assert reason in found[name].message
        assert found[name].hint
    assert len(report.problems) == len(slips)  # the good entries raised nothing
    sandbox.assert_clean(upload)
    assert not (tmp_path / "evil_absolute.png").exists()


def test_nul_byte_in_a_zip_name_is_refused(sandbox) -> None:
    upload = write_zip(sandbox.upload_dir / "nul.zip", {**good_entries(), "cat/evXil.png": image_bytes()})
    patch_bytes(upload, b"evXil", b"ev\x00il")  # zipfile cannot write a NUL; the local and central names

    report = sandbox.validate(upload)

    assert codes(report) == [("cat/ev\\x00il.png", "unsafe_path")]
    assert "NUL" in report.problems[0].message
    sandbox.assert_clean(upload)


def test_nul_byte_in_a_tar_pax_path_is_refused(sandbox) -> None:
    info, data = tar_member("cat/x.png", image_bytes())
    info.pax_headers = {"path": "cat/ev\x00il.png"}
    upload = write_tar(sandbox.upload_dir / "nul.tar", good_entries(), mode="w", extra=[(info, data)])

    report = sandbox.validate(upload)

    assert codes(report) == [("cat/ev\\x00il.png", "unsafe_path")]
    sandbox.assert_clean(upload)


def test_tar_symlink_hardlink_and_special_files_are_refused(sandbox, tmp_path: Path) -> None:
    extra = [
        tar_member("cat/link.png", type=tarfile.SYMTYPE, linkname=str(tmp_path / "evil_target")),
        # The classic: a link to outside, then a file written "through" it.
        tar_member("out", type=tarfile.SYMTYPE, linkname=str(tmp_path)),
        tar_member("out/evil_through_link.png", image_bytes()),
        tar_member("dog/hard.png", type=tarfile.LNKTYPE, linkname="cat/0.png"),
        tar_member("dog/fifo.png", type=tarfile.FIFOTYPE),
        tar_member("dog/dev.png", type=tarfile.CHRTYPE),
    ]
    upload = write_tar(sandbox.upload_dir / "links.tar.gz", good_entries(), extra=extra)

    report = sandbox.validate(upload)

    problems = {p.path: p for p in report.problems}
    assert problems["cat/link.png"].code == "link_entry"
    assert "symbolic link" in problems["cat/link.png"].message
    assert problems["out"].code == "link_entry"
    assert problems["dog/hard.png"].code == "link_entry"
    assert "hard link" in problems["dog/hard.png"].message
    assert problems["dog/fifo.png"].code == "special_file"
    assert problems["dog/dev.png"].code == "special_file"
    sandbox.assert_clean(upload)


def test_zip_entries_with_symlink_or_device_mode_bits_are_refused(sandbox) -> None:
    link = zipfile.ZipInfo("cat/link.png")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    fifo = zipfile.ZipInfo("dog/fifo.png")
    fifo.create_system = 3
    fifo.external_attr = (stat.S_IFIFO | 0o644) << 16
    upload = zip_with_info(
        sandbox.upload_dir / "links.zip", [(link, b"/etc/passwd"), (fifo, b"")], good_entries()
    )

    report = sandbox.validate(upload)

    assert codes(report) == [("cat/link.png", "link_entry"), ("dog/fifo.png", "special_file")]
    sandbox.assert_clean(upload)


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_nested_archives_are_refused(sandbox, kind: str) -> None:
    entries = {**good_entries(), "cat/more.zip": b"PK\x05\x06" + b"\0" * 18, "dog/more.tar.gz": b"\x1f\x8b"}
    upload = sandbox.upload_dir / f"nested.{kind}"
    write_zip(upload, entries) if kind == "zip" else write_tar(upload, entries)

    report = sandbox.validate(upload)

    assert codes(report) == [("cat/more.zip", "nested_archive"), ("dog/more.tar.gz", "nested_archive")]
    sandbox.assert_clean(upload)


def test_duplicate_entries_and_file_folder_clashes_are_refused(sandbox) -> None:
    upload = sandbox.upload_dir / "dup.zip"
    with zipfile.ZipFile(upload, "w") as archive:
        for name, data in good_entries().items():
            archive.writestr(name, data)
        with pytest.warns(UserWarning, match="Duplicate name"):
            archive.writestr("cat/0.png", image_bytes(seed=9))
        archive.writestr("dog/0.png/inner.png", image_bytes())

    report = sandbox.validate(upload)

    assert codes(report) == [("cat/0.png", "duplicate_entry"), ("dog/0.png/inner.png", "duplicate_entry")]
    sandbox.assert_clean(upload)


def test_encrypted_zip_entry_is_refused(sandbox) -> None:
    upload = write_zip(sandbox.upload_dir / "secret.zip", {**good_entries(), "cat/secret.png": image_bytes()})
    # Set the "encrypted" flag bit of that entry in its local and central headers.
    data = bytearray(upload.read_bytes())
    for signature, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = 0
        while (start := data.find(signature, start)) >= 0:
            name_at = start + (30 if signature == b"PK\x03\x04" else 46)
            if data[name_at : name_at + 14] == b"cat/secret.png":
                data[start + flag_at] |= 1
            start += 4
    upload.write_bytes(bytes(data))

    report = sandbox.validate(upload)

    assert codes(report) == [("cat/secret.png", "encrypted_entry")]
    sandbox.assert_clean(upload)


def test_zip_bomb_is_stopped_by_the_ratio_while_streaming(sandbox) -> None:
    upload = write_zip(
        sandbox.upload_dir / "bomb.zip", {**good_entries(), "cat/zeros.png": b"\0" * (48 << 20)}
    )
    limits = DatasetLimits(max_compression_ratio=50, ratio_grace_bytes=1 << 20)

    report = sandbox.validate(upload, limits)

    [refusal] = report.problems
    assert refusal.code == "compression_ratio"
    expanded = int(re.search(r"expanded to ([\d,]+)", refusal.message).group(1).replace(",", ""))
    assert expanded < 8 << 20  # stopped a few chunks in, not after 48 MiB
    sandbox.assert_clean(upload)


def test_zip_whose_declared_sizes_lie_is_refused(sandbox) -> None:
    data = b"\0" * (8 << 20)
    upload = write_zip(sandbox.upload_dir / "liar.zip", {**good_entries(), "cat/zeros.png": data})
    # Claim 1,000 bytes uncompressed in the local and central headers of the 8 MiB entry.
    blob = bytearray(upload.read_bytes())
    for signature, size_at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = 0
        while (start := blob.find(signature, start)) >= 0:
            if struct.unpack_from("<L", blob, start + size_at)[0] == len(data):
                struct.pack_into("<L", blob, start + size_at, 1000)
            start += 4
    upload.write_bytes(bytes(blob))

    report = sandbox.validate(upload)

    [refusal] = report.problems
    assert refusal.code == "corrupt_archive"
    assert refusal.path == "cat/zeros.png"
    sandbox.assert_clean(upload)


def test_tar_gz_bomb_is_stopped_by_the_ratio_and_tar_total_by_the_size_cap(sandbox) -> None:
    bomb = write_tar(
        sandbox.upload_dir / "bomb.tar.gz", {**good_entries(), "cat/zeros.png": b"\0" * (32 << 20)}
    )
    report = sandbox.validate(bomb, DatasetLimits(max_compression_ratio=50, ratio_grace_bytes=1 << 20))
    assert [p.code for p in report.problems] == ["compression_ratio"]
    sandbox.assert_clean(bomb)

    bomb.unlink()
    big = write_tar(
        sandbox.upload_dir / "big.tar",
        {**good_entries(), "cat/big.png": image_bytes(size=(600, 600))},
        mode="w",
    )
    report = sandbox.validate(big, DatasetLimits(max_total_bytes=256 << 10))
    assert [p.code for p in report.problems] == ["too_large"]
    assert "262,144 bytes" in report.problems[0].message
    sandbox.assert_clean(big)


def test_oversized_tar_header_is_refused_before_it_is_buffered(sandbox) -> None:
    info, data = tar_member("cat/x.png", image_bytes())
    info.pax_headers = {"comment": "x" * (512 << 10)}
    upload = write_tar(sandbox.upload_dir / "pax.tar.gz", good_entries(), extra=[(info, data)])

    report = sandbox.validate(upload, DatasetLimits(max_header_bytes=64 << 10))

    assert [p.code for p in report.problems] == ["header_too_large"]
    sandbox.assert_clean(upload)


def test_a_million_entry_tar_stops_at_the_count_cap_without_reading_it_all(sandbox) -> None:
    upload = tar_gz_of_many_entries(sandbox.upload_dir / "million.tar.gz", 1_000_000)
    seen: list[int] = []
    started = time.perf_counter()

    report = sandbox.validate(
        upload, DatasetLimits(max_files=5_000), on_progress=lambda d, t, p: seen.append(d)
    )

    elapsed = time.perf_counter() - started
    assert [p.code for p in report.problems] == ["too_many_files"]
    assert "reading stopped at entry 5,001" in report.problems[0].message
    # Not read to the end: the compressed bytes consumed are a small part of the file.
    assert max(seen) < upload.stat().st_size / 10
    sandbox.assert_clean(upload)
    print(f"1,000,000-entry tar.gz refused after {elapsed:.2f} s")


def test_zip_entry_count_is_refused_from_the_end_record_and_from_the_directory(sandbox) -> None:
    # A zip64 end record declares 1,000,000 entries: refused before the directory is parsed.
    upload = write_zip(sandbox.upload_dir / "declared.zip", good_entries())
    blob = upload.read_bytes()
    eocd = blob.rfind(b"PK\x05\x06")
    cd_size, cd_offset = struct.unpack_from("<LL", blob, eocd + 12)
    zip64_end = struct.pack(
        "<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, 1_000_000, 1_000_000, cd_size, cd_offset
    )
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, eocd, 1)
    end = bytearray(blob[eocd:])
    struct.pack_into("<HH", end, 8, 0xFFFF, 0xFFFF)
    upload.write_bytes(blob[:eocd] + zip64_end + locator + bytes(end))
    report = sandbox.validate(upload, DatasetLimits(max_files=100))
    assert [p.code for p in report.problems] == ["too_many_files"]
    assert "declares 1,000,000 entries" in report.problems[0].message
    upload.unlink()

    honest = write_zip(sandbox.upload_dir / "many.zip", {f"d/{i}.txt": b"" for i in range(3_000)})
    blob = bytearray(honest.read_bytes())
    eocd = blob.rfind(b"PK\x05\x06")
    count = struct.unpack_from("<H", blob, eocd + 10)[0]
    assert count == 3_000
    report = sandbox.validate(honest, DatasetLimits(max_files=1_000))
    assert [p.code for p in report.problems] == ["too_many_files"]
    assert "declares 3,000 entries" in report.problems[0].message

    # The end record lies (says 2): walking the directory stops at the cap all the same.
    struct.pack_into("<HH", blob, eocd + 8, 2, 2)
    honest.write_bytes(bytes(blob))
    report = sandbox.validate(honest, DatasetLimits(max_files=1_000))
    assert [p.code for p in report.problems] == ["too_many_files"]
    assert "reading stopped at entry 1,001" in report.problems[0].message
    sandbox.assert_clean(honest)


@pytest.mark.parametrize("kind", ["zip", "tar.gz", "tar.xz", "tar.bz2"])
def test_truncated_archives_are_refused_as_corrupt(sandbox, kind: str) -> None:
    entries = {**good_entries(), "cat/big.png": image_bytes(size=(300, 300))}
    upload = sandbox.upload_dir / f"cut.{kind}"
    if kind == "zip":
        write_zip(upload, entries)
    else:
        write_tar(upload, entries, mode=f"w:{kind.split('.')[1]}")
    data = upload.read_bytes()
    upload.write_bytes(data[: len(data) * 2 // 3])

    report = sandbox.validate(upload)

    assert report.status == "invalid"
    assert [p.code for p in report.problems] == ["corrupt_archive"]
    sandbox.assert_clean(upload)


def test_an_upload_that_is_no_archive_nor_image_is_refused(sandbox) -> None:
    upload = sandbox.upload_dir / "page.bin"
    upload.write_bytes(b"<!doctype html><html><body>not a dataset</body></html>")
    report = sandbox.validate(upload, filename="dataset.zip")
    assert [p.code for p in report.problems] == ["unsupported_upload"]
    sandbox.assert_clean(upload)


def test_extract_archive_alone_writes_only_under_dest_and_skips_junk(tmp_path: Path) -> None:
    entries = {
        **good_entries(),
        "__MACOSX/cat/._0.png": b"junk",
        "cat/.DS_Store": b"junk",
        "dog/Thumbs.db": b"junk",
        "./dog/./9.png": image_bytes(),
    }
    upload = write_zip(tmp_path / "a.zip", entries)
    dest = tmp_path / "out"

    extracted = extract_archive(upload, dest)

    assert sorted(extracted.files) == sorted([*good_entries(), "dog/9.png"])
    assert sorted(extracted.ignored) == ["__MACOSX/cat/._0.png", "cat/.DS_Store", "dog/Thumbs.db"]
    assert tree(dest) == {"cat", "dog", *good_entries(), "dog/9.png"}
    assert (dest / "dog/9.png").read_bytes() == image_bytes()


def test_extract_archive_refusal_removes_the_destination(tmp_path: Path) -> None:
    upload = write_zip(tmp_path / "a.zip", {**good_entries(), "../evil.png": b"x"})
    with pytest.raises(ArchiveRefused) as refused:
        extract_archive(upload, tmp_path / "out")
    assert [p.code for p in refused.value.problems] == ["unsafe_path"]
    assert tree(tmp_path) == {"a.zip"}


def test_zip_entries_sharing_their_data_are_refused(sandbox) -> None:
    # An overlapping-entries bomb points many directory records at the same compressed data.
    upload = write_zip(sandbox.upload_dir / "overlap.zip", {**good_entries(), "cat/z.png": image_bytes()})
    blob = bytearray(upload.read_bytes())
    records = []
    start = 0
    while (start := blob.find(b"PK\x01\x02", start)) >= 0:
        records.append(start)
        start += 4
    first_offset = struct.unpack_from("<L", blob, records[0] + 42)[0]
    struct.pack_into("<L", blob, records[-1] + 42, first_offset)
    upload.write_bytes(bytes(blob))

    report = sandbox.validate(upload)

    assert codes(report) == [("cat/z.png", "corrupt_archive")]
    assert "overlapping" in report.problems[0].message
    sandbox.assert_clean(upload)
