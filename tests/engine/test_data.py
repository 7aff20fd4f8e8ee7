"""Safe image opening, dataset scanning (folders and labels.csv) and the resize-once cache."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from worker.patchgd.data import (
    DatasetError,
    ImageError,
    ImageFolderDataset,
    load_resized,
    make_loaders,
    open_image,
    scan_dataset,
)
from worker.patchgd.grid import normalize_uint8


def _noise(size: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _bomb_png(path: Path, side: int) -> None:
    """A tiny PNG whose header declares side x side pixels (a decompression bomb's signature)."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * 1024)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", body)
        + _png_chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "fmt,suffix", [("PNG", ".png"), ("JPEG", ".jpg"), ("TIFF", ".tif"), ("BMP", ".bmp"), ("WEBP", ".webp")]
)
def test_allowed_formats_open_as_rgb(tmp_path: Path, fmt: str, suffix: str) -> None:
    path = tmp_path / f"img{suffix}"
    _noise().save(path, format=fmt)
    image = open_image(path)
    assert image.mode == "RGB" and image.size == (48, 48)


def test_grayscale_and_transparent_palette_become_rgb(tmp_path: Path) -> None:
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((8, 8), 200, np.uint8), mode="L").save(gray)
    assert np.asarray(open_image(gray))[0, 0].tolist() == [200, 200, 200]
    palette = tmp_path / "pal.png"
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    image.save(palette, transparency=0)
    assert np.asarray(open_image(palette))[0, 0].tolist() == [10, 20, 30]


def test_format_is_checked_on_content_not_extension(tmp_path: Path) -> None:
    # A real PNG called .jpg is fine: the decoded format decides.
    disguised = tmp_path / "photo.jpg"
    _noise().save(disguised, format="PNG")
    assert open_image(disguised).size == (48, 48)


def test_gif_renamed_png_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "anim.png"
    _noise().convert("P").save(path, format="GIF")
    with pytest.raises(ImageError, match="GIF files are not supported"):
        open_image(path)


def test_pdf_renamed_png_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "doc.png"
    path.write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer\n%%EOF\n")
    with pytest.raises(ImageError, match="PDF files are not supported"):
        open_image(path)


def test_corrupt_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "noise.png"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ImageError, match="not a readable image"):
        open_image(path)


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    _noise(128).save(buffer, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        open_image(path)


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    _bomb_png(path, 200_000)  # 40 gigapixels declared in a ~100 byte file
    assert path.stat().st_size < 200
    with pytest.raises(ImageError, match="exceeds the limit"):
        open_image(path)
    # The limit is the caller's: a small image above a small limit is refused the same way.
    small = tmp_path / "small.png"
    _noise(64).save(small)
    with pytest.raises(ImageError, match="exceeds the limit of 1,000 pixels"):
        open_image(small, max_pixels=1000)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="file not found"):
        open_image(tmp_path / "nope.png")


def test_load_resized_shape(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    Image.new("RGB", (100, 40), (255, 0, 0)).save(path)
    array = load_resized(path, 32)
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8
    assert (array == [255, 0, 0]).all()


# --------------------------------------------------------------------------- datasets


def _class_tree(root: Path, counts: dict[str, int]) -> None:
    for offset, (name, count) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            _noise(24, seed=offset * 100 + i).save(root / name / f"{i:03d}.png")


def test_class_folders_sorted_and_stratified_split(tmp_path: Path) -> None:
    _class_tree(tmp_path, {"tumor": 10, "normal": 20})
    index = scan_dataset(tmp_path, val_fraction=0.2, test_fraction=0.1, seed=3)
    assert index.source == "folders"
    assert index.classes == ("normal", "tumor")
    counts = index.counts()
    assert counts["val"] == {"normal": 4, "tumor": 2}
    assert counts["test"] == {"normal": 2, "tumor": 1}
    assert counts["train"] == {"normal": 14, "tumor": 7}
    assert all(s.label == 1 for s in index.samples if s.path.parent.name == "tumor")
    again = scan_dataset(tmp_path, val_fraction=0.2, test_fraction=0.1, seed=3)
    assert [s.split for s in again.samples] == [s.split for s in index.samples]
    other = scan_dataset(tmp_path, val_fraction=0.2, test_fraction=0.1, seed=4)
    assert [s.split for s in other.samples] != [s.split for s in index.samples]


def test_tiny_class_keeps_a_training_image(tmp_path: Path) -> None:
    _class_tree(tmp_path, {"a": 1, "b": 2})
    index = scan_dataset(tmp_path, val_fraction=0.4, test_fraction=0.4)
    assert index.counts()["train"] == {"a": 1, "b": 1}


def test_empty_class_folder_is_an_error(tmp_path: Path) -> None:
    _class_tree(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "c").mkdir()
    with pytest.raises(DatasetError, match="without images: c"):
        scan_dataset(tmp_path)


def test_single_class_and_empty_folder_are_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no labels.csv and no class sub-folders"):
        scan_dataset(tmp_path)
    _class_tree(tmp_path, {"only": 3})
    with pytest.raises(DatasetError, match="at least two classes"):
        scan_dataset(tmp_path)


def test_split_folders_are_the_split(tmp_path: Path) -> None:
    _class_tree(tmp_path / "train", {"normal": 4, "tumor": 3})
    _class_tree(tmp_path / "val", {"normal": 1, "tumor": 2})
    _class_tree(tmp_path / "test", {"normal": 2, "tumor": 1})
    index = scan_dataset(tmp_path, val_fraction=0.5, test_fraction=0.3, seed=1)  # fractions unused
    assert index.source == "folders" and index.classes == ("normal", "tumor")
    assert index.counts() == {
        "train": {"normal": 4, "tumor": 3},
        "val": {"normal": 1, "tumor": 2},
        "test": {"normal": 2, "tumor": 1},
    }
    for sample in index.samples:
        assert sample.path.parent.parent.name == sample.split
        assert index.classes[sample.label] == sample.path.parent.name


def test_train_and_val_folders_alone_are_split_folders(tmp_path: Path) -> None:
    _class_tree(tmp_path / "train", {"a": 2, "b": 2})
    _class_tree(tmp_path / "val", {"a": 1, "b": 1})
    index = scan_dataset(tmp_path)
    assert index.classes == ("a", "b")  # not classes named "train" and "val"
    assert index.counts()["val"] == {"a": 1, "b": 1} and index.counts()["test"] == {"a": 0, "b": 0}


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"train/a": 2, "train/b": 2, "c": 2}, r"mixes split folders \(train\) with other folders \(c\)"),
        ({"val/a": 2, "val/b": 2}, "but no train/ folder"),
        (
            {"train/a": 2, "train/b": 2, "val/a": 1, "val/c": 1},
            r"val/ has other classes than train/: class\(es\) not in",
        ),
        (
            {"train/a": 2, "train/b": 2, "test/a": 1},
            r"test/ has other classes than train/: no folder for class\(es\) b",
        ),
        (
            {"train/a": 2, "train/b": 2, "val": 2},
            "split folder val/ has no class sub-folders .*holds images directly",
        ),
        ({"train/a": 2, "train/b": 0}, "without images: train/b"),
    ],
)
def test_ambiguous_split_layouts_are_refused(tmp_path: Path, layout: dict[str, int], message: str) -> None:
    for offset, (folder, count) in enumerate(layout.items()):
        (tmp_path / folder).mkdir(parents=True)
        for i in range(count):
            _noise(24, seed=offset * 100 + i).save(tmp_path / folder / f"{i:03d}.png")
    with pytest.raises(DatasetError, match=message):
        scan_dataset(tmp_path)


def _flat_images(root: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        _noise(24, seed=i).save(root / name)


def test_labels_csv_with_splits(tmp_path: Path) -> None:
    _flat_images(tmp_path, ["img/a.png", "img/b.png", "img/c.png", "img/d.png"])
    (tmp_path / "labels.csv").write_text(
        "image,label,split\nimg/a.png,3,train\nimg/b.png,1,train\nimg/c.png,3,val\nimg/d.png,1,test\n"
    )
    index = scan_dataset(tmp_path)
    assert index.source == "labels.csv"
    assert index.classes == ("1", "3")
    assert [(s.path.name, s.label, s.split) for s in index.samples] == [
        ("a.png", 1, "train"),
        ("b.png", 0, "train"),
        ("c.png", 1, "val"),
        ("d.png", 0, "test"),
    ]


@pytest.mark.parametrize(
    "body,message",
    [
        ("file,label\na.png,x\n", "missing column"),
        ("image,split\na.png,train\n", "missing column.*label"),
        ("image,label\na.png,x\nmissing.png,y\n", "do not exist: missing.png"),
        ("image,label\n../outside.png,x\na.png,y\n", "leaves the dataset folder"),
        ("image,label\nsub/../../outside.png,x\na.png,y\n", "leaves the dataset folder"),
        ("image,label\n/etc/passwd,x\na.png,y\n", "absolute path"),
        ("image,label\nC:\\\\Windows\\\\x.png,x\na.png,y\n", "absolute path"),
        ("image,label\na.png,x\na.png,y\n", "listed twice"),
        ("image,label\na.png,\n", "empty label"),
        ("image,label,split\na.png,x,holdout\n", "not one of train, val, test"),
        ("image,label\n", "no rows"),
        ("image,label,split\na.png,x,train\nb.png,y,val\n", "without any training image: y"),
    ],
)
def test_labels_csv_errors(tmp_path: Path, body: str, message: str) -> None:
    root = tmp_path / "data"
    _flat_images(root, ["a.png", "b.png"])
    _noise(8).save(tmp_path / "outside.png")
    (root / "labels.csv").write_text(body)
    with pytest.raises(DatasetError, match=message):
        scan_dataset(root)


def test_symlink_escaping_the_folder_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _flat_images(root, ["a.png"])
    _noise(8).save(tmp_path / "secret.png")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    (root / "labels.csv").write_text("image,label\na.png,x\nlink.png,y\n")
    with pytest.raises(DatasetError, match="outside the dataset folder"):
        scan_dataset(root)


def test_symlinked_class_folder_escaping_the_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _class_tree(root, {"a": 2})
    _class_tree(tmp_path / "elsewhere", {"b": 2})
    (root / "b").symlink_to(tmp_path / "elsewhere" / "b", target_is_directory=True)
    with pytest.raises(DatasetError, match="outside the dataset folder"):
        scan_dataset(root)


# --------------------------------------------------------------------------- resize-once cache


def test_second_epoch_reads_the_cache_without_decoding(tmp_path: Path) -> None:
    data, cache = tmp_path / "data", tmp_path / "cache"
    _class_tree(data, {"a": 3, "b": 3})
    index = scan_dataset(data, val_fraction=0, test_fraction=0)
    dataset = ImageFolderDataset(index.split("train"), 16, cache)

    first = [dataset[i] for i in range(len(dataset))]
    assert dataset.decodes == 6
    files = sorted(cache.rglob("*.npy"))
    assert len(files) == 6
    stamps = {f: f.stat().st_mtime_ns for f in files}

    second = [dataset[i] for i in range(len(dataset))]
    assert dataset.decodes == 6  # no decode in the second epoch
    assert {f: f.stat().st_mtime_ns for f in sorted(cache.rglob("*.npy"))} == stamps
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        assert torch.equal(x1, x2) and y1 == y2
        assert x1.shape == (3, 16, 16) and x1.dtype == torch.float32

    # A fresh dataset over the same cache (a new process, a new epoch) decodes nothing either.
    reopened = ImageFolderDataset(index.split("train"), 16, cache)
    assert torch.equal(reopened[0][0], first[0][0]) and reopened.decodes == 0
    # The cached value is the resized image, normalized like every other input.
    assert torch.equal(first[0][0], normalize_uint8(load_resized(index.split("train")[0].path, 16)))


def test_cache_follows_changes_of_the_source(tmp_path: Path) -> None:
    data, cache = tmp_path / "data", tmp_path / "cache"
    _class_tree(data, {"a": 1, "b": 1})
    samples = scan_dataset(data, val_fraction=0, test_fraction=0).split("train")
    dataset = ImageFolderDataset(samples, 8, cache)
    before = dataset[0][0]
    Image.new("RGB", (24, 24), (0, 255, 0)).save(samples[0].path)
    os.utime(samples[0].path, ns=(1, 10**18))
    after = dataset[0][0]
    assert dataset.decodes == 2 and not torch.equal(before, after)
    # Another resolution is another cache entry.
    assert ImageFolderDataset(samples, 12, cache)[0][0].shape == (3, 12, 12)


def test_make_loaders_are_seeded(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _class_tree(data, {"a": 8, "b": 8})
    index = scan_dataset(data, val_fraction=0.25, test_fraction=0.25, seed=1)

    def order(seed: int) -> list[int]:
        loaders = make_loaders(index, image_size=8, batch_size=4, cache_dir=tmp_path / "c", seed=seed)
        assert set(loaders) == {"train", "val", "test"}
        batches = [batch for batch in loaders["train"]]
        assert batches[0][0].shape == (4, 3, 8, 8)
        return torch.cat([labels for _, labels in batches]).tolist() + [
            int(x.sum() * 1000) for x, _ in batches
        ]

    assert order(5) == order(5)
    assert order(5) != order(6)
