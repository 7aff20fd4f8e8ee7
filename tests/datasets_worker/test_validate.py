"""Good datasets end ready with the right classes, counts, statistics and split; label problems are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from worker.datasets import DatasetLimits, ValidationCancelled, validate_folder, validate_upload
from worker.datasets.problems import HINTS

from .builders import (
    codes,
    good_entries,
    image_bytes,
    tree,
    write_pyramidal_tiff,
    write_svs,
    write_tar,
    write_tiff,
    write_zip,
)

ROOT = Path(__file__).resolve().parents[2]


def test_class_folder_zip_is_ready_with_stats_split_and_thumbnails(sandbox) -> None:
    entries = {
        **good_entries(("cat", "dog", "emu"), per_class=6, prefix="my data/"),
        "my data/emu/big.jpg": image_bytes("JPEG", (120, 80)),
    }
    upload = write_zip(sandbox.upload_dir / "good.zip", entries)

    report = sandbox.validate(upload, DatasetLimits(thumbnails_per_class=2))

    assert report.status == "ready", report.problems
    assert report.source == "folders"
    assert report.root == "my data"  # the one wrapping folder is unwrapped
    assert report.classes == ["cat", "dog", "emu"]
    assert report.class_to_index == {"cat": 0, "dog": 1, "emu": 2}
    assert report.class_counts == {"cat": 6, "dog": 6, "emu": 7}
    assert report.split_source == "seeded"
    assert sum(sum(c.values()) for c in report.split_counts.values()) == 19
    assert all(report.split_counts["train"][name] >= 1 for name in report.classes)
    assert report.split_counts["val"]["cat"] == 1 and report.split_counts["test"]["cat"] == 1
    assert set(report.splits) == set(report.labels) == {k.removeprefix("my data/") for k in entries}
    stats = report.image_stats
    assert stats["count"] == 19
    assert stats["width"] == {"min": 32, "median": 35, "max": 120}
    assert stats["height"]["max"] == 80
    assert stats["megapixels"]["max"] == pytest.approx(120 * 80 / 1e6, abs=1e-3)
    assert stats["formats"] == {"JPEG": 1, "PNG": 18}
    assert report.pyramids == []
    assert [(t["class"], t["file"]) for t in report.thumbnails] == [
        ("cat", "_thumbnails/0.jpg"),
        ("cat", "_thumbnails/1.jpg"),
        ("dog", "_thumbnails/2.jpg"),
        ("dog", "_thumbnails/3.jpg"),
        ("emu", "_thumbnails/4.jpg"),
        ("emu", "_thumbnails/5.jpg"),
    ]
    for thumb in report.thumbnails:
        with Image.open(sandbox.dataset / thumb["file"]) as image:
            assert image.format == "JPEG" and max(image.size) <= 256
        assert (sandbox.dataset / "images" / report.root / thumb["path"]).is_file()
    json.dumps(report.to_dict())  # the caller stores it as JSON


def test_seeded_split_is_the_same_for_the_same_files_whatever_the_archive_order(
    sandbox, tmp_path: Path
) -> None:
    entries = good_entries(("a", "b"), per_class=10)
    first = validate_upload(write_zip(tmp_path / "one.zip", entries), tmp_path / "one", seed=7)
    second = validate_upload(
        write_tar(tmp_path / "two.tar.gz", dict(reversed(entries.items()))), tmp_path / "two", seed=7
    )
    other_seed = validate_upload(write_zip(tmp_path / "three.zip", entries), tmp_path / "three", seed=8)
    assert first.ready and second.ready
    assert first.splits == second.splits
    assert other_seed.splits != first.splits
    assert first.split_counts == {
        "train": {"a": 6, "b": 6},
        "val": {"a": 2, "b": 2},
        "test": {"a": 2, "b": 2},
    }


def test_labels_csv_with_string_labels_reports_the_mapping(sandbox) -> None:
    images = {f"img/{i}.png": image_bytes(seed=i) for i in range(6)}
    csv = "image,label\n" + "".join(
        f"img/{i}.png,{['benign', 'Malignant', 'atypical'][i % 3]}\n" for i in range(6)
    )
    upload = write_zip(sandbox.upload_dir / "csv.zip", {**images, "labels.csv": csv.encode()})

    report = sandbox.validate(upload)

    assert report.status == "ready", report.problems
    assert report.source == "labels.csv"
    assert report.label_kind == "names"
    assert report.classes == ["Malignant", "atypical", "benign"]  # sorted as text
    assert report.class_to_index == {"Malignant": 0, "atypical": 1, "benign": 2}
    assert report.labels["img/1.png"] == "Malignant"
    assert report.class_counts == {"Malignant": 2, "atypical": 2, "benign": 2}


def test_labels_csv_with_integer_labels_sorts_them_as_ordinal_numbers(sandbox) -> None:
    grades = [0, 1, 2, 10, 2, 10, 1, 0]
    images = {f"{i}.jpg": image_bytes("JPEG", seed=i) for i in range(len(grades))}
    csv = "Image,Label\r\n" + "".join(f"{i}.jpg,{g}\r\n" for i, g in enumerate(grades))
    upload = write_tar(
        sandbox.upload_dir / "grades.tar.xz", {**images, "labels.csv": csv.encode()}, mode="w:xz"
    )

    report = sandbox.validate(upload)

    assert report.status == "ready", report.problems
    assert report.label_kind == "integers"
    assert report.classes == ["0", "1", "2", "10"]  # 10 after 2, not between 1 and 2
    assert report.class_to_index == {"0": 0, "1": 1, "2": 2, "10": 3}


def test_labels_csv_with_a_split_column_is_an_explicit_split(sandbox) -> None:
    rows = [("a", "train"), ("a", "train"), ("a", "val"), ("b", "train"), ("b", "test"), ("b", "train")]
    images = {f"{i}.png": image_bytes(seed=i) for i in range(len(rows))}
    csv = "image,label,split\n" + "".join(f"{i}.png,{c},{s}\n" for i, (c, s) in enumerate(rows))
    upload = write_zip(sandbox.upload_dir / "split.zip", {**images, "labels.csv": csv.encode()})

    report = sandbox.validate(upload)

    assert report.status == "ready", report.problems
    assert report.split_source == "explicit"
    assert report.splits == {f"{i}.png": s for i, (_, s) in enumerate(rows)}
    assert report.split_counts == {
        "train": {"a": 2, "b": 2},
        "val": {"a": 1, "b": 0},
        "test": {"a": 0, "b": 1},
    }


def test_split_folder_archive_keeps_its_split(sandbox) -> None:
    entries = {
        **good_entries(("cat", "dog"), per_class=3, prefix="train/"),
        **good_entries(("cat", "dog"), per_class=1, prefix="val/"),
        **good_entries(("cat",), per_class=2, prefix="test/"),
    }
    upload = write_tar(sandbox.upload_dir / "split.tar.bz2", entries, mode="w:bz2")

    report = sandbox.validate(upload)

    assert report.status == "ready", report.problems
    assert report.source == "split_folders"
    assert report.split_source == "explicit"
    assert report.classes == ["cat", "dog"]
    assert report.split_counts == {
        "train": {"cat": 3, "dog": 3},
        "val": {"cat": 1, "dog": 1},
        "test": {"cat": 2, "dog": 0},
    }
    assert report.splits["val/cat/0.png"] == "val"
    assert report.class_counts == {"cat": 6, "dog": 4}


def test_pyramidal_tiff_dataset_reports_levels_and_microns_per_pixel(sandbox, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    entries = {}
    for name in ("tumour", "normal"):
        for i in range(2):
            path = write_pyramidal_tiff(source / f"{name}{i}.tif", 1024 + 256 * i, tile=256)
            entries[f"{name}/{i}.tif"] = path.read_bytes()
    entries["normal/scan.tiff"] = write_tiff(source / "scan.tiff", 128, mpp=0.25).read_bytes()
    upload = write_zip(sandbox.upload_dir / "slides.zip", entries)
    # The in-memory limit below the level-0 size: the pyramids are checked by header and smallest level.
    report = sandbox.validate(upload, DatasetLimits(max_pixels=512 * 512))

    assert report.status == "ready", report.problems
    pyramids = {p["path"]: p for p in report.pyramids}
    assert pyramids["tumour/0.tif"]["levels"] == [[1024, 1024], [512, 512], [256, 256]]
    assert pyramids["tumour/1.tif"]["levels"][0] == [1280, 1280]
    assert pyramids["normal/scan.tiff"]["levels"] == [[128, 128]]
    assert pyramids["normal/scan.tiff"]["mpp"] == pytest.approx([0.25, 0.25])
    assert report.image_stats["width"] == {"min": 128, "median": 1024.0, "max": 1280}
    assert report.image_stats["formats"] == {"TIFF": 5}
    assert len(report.thumbnails) == 5  # smallest levels are <= the thumbnail source limit


def test_svs_slide_dataset_reports_vendor_levels_and_mpp_from_openslide(sandbox, tmp_path: Path) -> None:
    entries = {
        f"{c}/{i}.svs": write_svs(tmp_path / f"{c}{i}.svs", 512, mpp=0.499).read_bytes()
        for c in "ab"
        for i in range(2)
    }
    for path in tmp_path.glob("*.svs"):
        path.unlink()
    upload = write_zip(sandbox.upload_dir / "svs.zip", entries)

    report = sandbox.validate(upload)

    assert report.status == "ready", report.problems
    assert report.image_stats["formats"] == {"APERIO": 4}
    slide = {p["path"]: p for p in report.pyramids}["a/0.svs"]
    assert slide["levels"] == [[512, 512], [256, 256]]
    assert slide["mpp"] == pytest.approx([0.499, 0.499])


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        pytest.param(
            {"a/1.png": image_bytes(), "a/2.png": image_bytes(seed=1)},
            [("", "too_few_classes")],
            id="single-class",
        ),
        pytest.param(
            {**good_entries(("a",), 2), "b/1.png": image_bytes()},
            [("b", "class_too_small")],
            id="class-with-one-image",
        ),
        pytest.param(
            {**good_entries(), "loose.png": image_bytes()},
            [("loose.png", "image_outside_class")],
            id="image-outside-class",
        ),
        pytest.param(
            {
                "a.png": image_bytes(),
                "b.png": image_bytes(seed=1),
                "c.png": image_bytes(seed=2),
                "d.png": image_bytes(seed=3),
                "extra.png": image_bytes(seed=4),
                "labels.csv": b"image,label\na.png,x\nb.png,x\nc.png,y\nd.png,y\ngone.png,y\n",
            },
            [("gone.png", "missing_file"), ("extra.png", "unlabelled_image")],
            id="labels-csv-missing-and-unlabelled",
        ),
        pytest.param(
            {"a.png": image_bytes(), "labels.csv": b"file;class\na.png;x\n"},
            [("labels.csv", "labels_csv")],
            id="labels-csv-bad-header",
        ),
        pytest.param(
            {
                **good_entries(prefix="train/"),
                **good_entries(("fox",), 2, prefix="val/"),
                "notes/x.png": image_bytes(),
            },
            [("notes/x.png", "unexpected_folder"), ("fox", "class_without_train")],
            id="split-folders",
        ),
    ],
)
def test_label_problems_are_named(
    sandbox, entries: dict[str, bytes], expected: list[tuple[str, str]]
) -> None:
    upload = write_zip(sandbox.upload_dir / "labels.zip", entries)
    report = sandbox.validate(upload)
    assert report.status == "invalid"
    assert sorted(codes(report)) == sorted(expected)
    sandbox.assert_clean(upload)


def test_progress_reports_extraction_bytes_then_every_file_checked(sandbox) -> None:
    upload = write_zip(sandbox.upload_dir / "p.zip", good_entries(per_class=5))
    calls: list[tuple[int, int | None, str]] = []

    report = sandbox.validate(
        upload, on_progress=lambda done, total, phase: calls.append((done, total, phase))
    )

    assert report.ready
    extracting = [c for c in calls if c[2] == "extracting"]
    checking = [c for c in calls if c[2] == "checking"]
    assert extracting and all(total == upload.stat().st_size for _, total, _ in extracting)
    assert [d for d, _, _ in extracting] == sorted(d for d, _, _ in extracting)
    assert checking == [(i, 10, "checking") for i in range(1, 11)]
    assert calls.index(checking[0]) > calls.index(extracting[-1])


@pytest.mark.parametrize("phase", ["extracting", "checking"])
def test_should_stop_aborts_and_removes_everything_written(sandbox, phase: str) -> None:
    upload = write_zip(sandbox.upload_dir / "s.zip", good_entries(per_class=10))
    seen: list[str] = []

    def should_stop() -> bool:
        return seen.count(phase) >= 3  # a dataset deleted a few files into this phase

    with pytest.raises(ValidationCancelled):
        sandbox.validate(upload, should_stop=should_stop, on_progress=lambda d, t, p: seen.append(p))
    assert seen.count(phase) == 3  # stopped promptly, at the next file or chunk
    sandbox.assert_clean(upload)


def test_single_image_upload_is_checked_as_one_image(sandbox, tmp_path: Path) -> None:
    upload = write_svs(sandbox.upload_dir / "stored-upload-0001", 512)
    report = sandbox.validate(upload, filename="case 12.svs")
    assert report.status == "ready", report.problems
    assert report.source == "image" and report.classes == []
    assert report.pyramids[0]["path"] == "case 12.svs"
    assert (sandbox.dataset / "images" / "case 12.svs").is_file()
    assert report.thumbnails[0]["file"] == "_thumbnails/0.jpg"

    bad = sandbox.upload_dir / "stored-upload-0002"
    bad.write_bytes(b"<html></html>")
    second = validate_upload(bad, tmp_path / "other", filename="slide.svs")
    assert codes(second) == [("slide.svs", "content_mismatch")]
    assert tree(tmp_path / "other") == set()


def test_docs_describe_every_problem_code() -> None:
    text = (ROOT / "docs" / "datasets.md").read_text()
    missing = [code for code in HINTS if f"`{code}`" not in text]
    assert not missing


def test_validating_a_folder_in_place_reports_links_instead_of_following_them(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for name, data in good_entries().items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "x.png").write_bytes(image_bytes())
    (root / "cat" / "outside.png").symlink_to(secret / "x.png")
    (root / "dog" / "outside").symlink_to(secret)

    report = validate_folder(root, tmp_path / "thumbs")

    assert sorted(codes(report)) == [("cat/outside.png", "link_entry"), ("dog/outside", "link_entry")]


def test_bad_split_fractions_are_refused_before_any_work(sandbox) -> None:
    upload = write_zip(sandbox.upload_dir / "f.zip", good_entries())
    with pytest.raises(ValueError, match="sum to less than 1"):
        sandbox.validate(upload, val_fraction=0.6, test_fraction=0.5)
    assert not sandbox.dataset.exists()
