"""Bad images inside an otherwise good archive: each named with what is wrong, all reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import tifffile

from worker.datasets import DatasetLimits

from .builders import (
    codes,
    good_entries,
    image_bytes,
    png_claiming,
    write_pyramidal_tiff,
    write_tiff,
    write_zip,
)


def _tiff_with_tiles_past_the_end(tmp_path: Path) -> bytes:
    path = write_tiff(tmp_path / "t.tif", 64, tile=32)
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[0].tags["TileOffsets"]
        where, count = tag.valueoffset, len(tag.value)
    data = bytearray(path.read_bytes())
    for i in range(count):
        data[where + 4 * i : where + 4 * i + 4] = (len(data) + 10_000 * (i + 1)).to_bytes(4, "little")
    path.unlink()
    return bytes(data)


def test_every_bad_image_is_reported_with_path_code_message_and_hint(sandbox, tmp_path: Path) -> None:
    jpeg = image_bytes("JPEG", (256, 256))
    entries = {
        **good_entries(per_class=3),
        "cat/bomb.png": png_claiming(50_000, 50_000),
        "cat/truncated.jpg": jpeg[: len(jpeg) * 6 // 10],
        "cat/page.png": b"<!DOCTYPE html>\n<html><body>Sign in</body></html>",
        "dog/tiles.tif": _tiff_with_tiles_past_the_end(tmp_path),
        "dog/photo.png": image_bytes("JPEG"),
        "dog/archive.png": b"PK\x03\x04" + b"\0" * 40,
        "dog/empty.jpg": b"",
        "dog/anim.gif": image_bytes("GIF"),
        "dog/notes.txt": b"hello",
    }
    upload = write_zip(sandbox.upload_dir / "bad.zip", entries)

    report = sandbox.validate(upload)

    assert report.status == "invalid"
    found = {p.path: p for p in report.problems}
    assert set(found) == {
        "cat/bomb.png",
        "cat/truncated.jpg",
        "cat/page.png",
        "dog/tiles.tif",
        "dog/photo.png",
        "dog/archive.png",
        "dog/empty.jpg",
        "dog/anim.gif",
        "dog/notes.txt",
    }
    assert found["cat/bomb.png"].code == "image_too_large"
    assert "decompression bomb" in found["cat/bomb.png"].message
    assert found["cat/truncated.jpg"].code == "corrupt_image"
    assert "truncated" in found["cat/truncated.jpg"].message
    assert found["cat/page.png"].code == "content_mismatch"
    assert "HTML page" in found["cat/page.png"].message
    assert found["dog/tiles.tif"].code == "corrupt_image"
    assert "past the end" in found["dog/tiles.tif"].message
    assert found["dog/photo.png"].code == "content_mismatch"
    assert "JPEG" in found["dog/photo.png"].message
    assert found["dog/archive.png"].code == "content_mismatch"
    assert "ZIP archive" in found["dog/archive.png"].message
    assert found["dog/empty.jpg"].code == "empty_file"
    assert found["dog/anim.gif"].code == "unsupported_format"
    assert found["dog/notes.txt"].code == "unsupported_format"
    assert all(p.hint and p.message for p in report.problems)
    sandbox.assert_clean(upload)


def test_pixel_limit_is_checked_from_the_header_with_the_dimensions_named(sandbox) -> None:
    entries = {**good_entries(), "dog/huge.png": png_claiming(3000, 2000)}
    upload = write_zip(sandbox.upload_dir / "huge.zip", entries)

    report = sandbox.validate(upload, DatasetLimits(max_pixels=1_000_000))

    assert codes(report) == [("dog/huge.png", "image_too_large")]
    assert "3,000x2,000 = 6,000,000 pixels" in report.problems[0].message
    assert "1,000,000" in report.problems[0].message
    sandbox.assert_clean(upload)


def test_a_truncated_jpeg_alone_is_found_by_the_full_decode(sandbox) -> None:
    jpeg = image_bytes("JPEG", (512, 384), seed=3)
    upload = write_zip(
        sandbox.upload_dir / "cut.zip", {**good_entries(), "cat/cut.jpg": jpeg[: len(jpeg) - 4000]}
    )

    report = sandbox.validate(upload)

    assert codes(report) == [("cat/cut.jpg", "corrupt_image")]
    sandbox.assert_clean(upload)


def test_problem_list_is_capped_with_a_count_of_the_rest(sandbox) -> None:
    entries = {**good_entries(), **{f"cat/page{i}.png": b"<html></html>" for i in range(12)}}
    upload = write_zip(sandbox.upload_dir / "many.zip", entries)

    report = sandbox.validate(upload, DatasetLimits(max_problems=5))

    assert [p.code for p in report.problems] == ["content_mismatch"] * 5 + ["too_many_problems"]
    assert "7 more problem(s)" in report.problems[-1].message


def test_a_large_tiff_that_cannot_be_streamed_is_named(sandbox, tmp_path: Path) -> None:
    import numpy as np

    path = tmp_path / "deep.tif"
    tifffile.imwrite(path, np.zeros((256, 256, 3), np.uint16), tile=(64, 64), photometric="rgb")
    entries = {**good_entries(), "dog/deep.tif": path.read_bytes()}
    path.unlink()
    upload = write_zip(sandbox.upload_dir / "deep.zip", entries)

    # Above the in-memory limit, so it would have to be streamed: 16-bit TIFF cannot be.
    report = sandbox.validate(upload, DatasetLimits(max_pixels=128 * 128))

    assert codes(report) == [("dog/deep.tif", "unsupported_tiff")]
    assert "8-bit" in report.problems[0].message
    sandbox.assert_clean(upload)


def test_a_pyramid_whose_smallest_level_does_not_decode_is_corrupt(sandbox, tmp_path: Path) -> None:
    path = write_pyramidal_tiff(tmp_path / "p.tif", 1024, tile=256)
    with tifffile.TiffFile(path) as tif:
        smallest = tif.series[0].levels[-1].keyframe
        offset, count = smallest.dataoffsets[0], smallest.databytecounts[0]
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = bytes(count)  # zeros are not a zlib stream
    path.unlink()
    upload = write_zip(sandbox.upload_dir / "p.zip", {**good_entries(), "cat/p.tif": bytes(data)})

    report = sandbox.validate(upload, DatasetLimits(max_pixels=512 * 512))

    assert codes(report) == [("cat/p.tif", "corrupt_image")]
    assert "smallest level" in report.problems[0].message
    sandbox.assert_clean(upload)


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_files"):
        DatasetLimits(max_files=0)
    with pytest.raises(ValueError, match="max_compression_ratio"):
        DatasetLimits(max_compression_ratio=0.5)


def test_a_tiff_with_more_pages_than_the_limit_is_refused(sandbox, tmp_path: Path) -> None:
    import numpy as np

    path = tmp_path / "stack.tif"
    with tifffile.TiffWriter(path) as writer:
        for _ in range(6):
            writer.write(np.zeros((16, 16, 3), np.uint8), photometric="rgb", metadata=None)
    entries = {**good_entries(), "cat/stack.tif": path.read_bytes()}
    path.unlink()
    upload = write_zip(sandbox.upload_dir / "stack.zip", entries)

    report = sandbox.validate(upload, DatasetLimits(max_tiff_pages=4))

    assert codes(report) == [("cat/stack.tif", "unsupported_tiff")]
    assert "more than 4 pages" in report.problems[0].message
