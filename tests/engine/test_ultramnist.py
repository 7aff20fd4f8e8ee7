"""The UltraMNIST-style generator: deterministic, tiny digits, no digit leaks across splits."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from worker.patchgd.data import scan_dataset
from worker.patchgd.ultramnist import (
    SPLITS,
    bucket,
    make_ultramnist,
    mnist_digits,
    render_digit,
    split_pools,
)

COUNTS = {"train": 12, "val": 6, "test": 6}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("um")
    summary = make_ultramnist(out, canvas_size=128, counts=COUNTS, seed=3)
    return out, summary


def _digest(folder) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(folder).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_files_other_seed_other_files(generated, tmp_path) -> None:
    out, _ = generated
    make_ultramnist(tmp_path / "again", canvas_size=128, counts=COUNTS, seed=3)
    make_ultramnist(tmp_path / "other", canvas_size=128, counts=COUNTS, seed=4)
    assert _digest(tmp_path / "again") == _digest(out)
    assert _digest(tmp_path / "other") != _digest(out)


def test_pools_are_disjoint_and_cover_the_digits() -> None:
    pools = split_pools(5000, seed=3)
    sets = [set(pools[s].tolist()) for s in SPLITS]
    assert sum(map(len, sets)) == 5000 and len(set.union(*sets)) == 5000


def test_every_canvas_has_one_tiny_digit_and_3_to_5_digits(generated) -> None:
    _, summary = generated
    for record in summary["canvases"].values():
        digits = record["digits"]
        assert 3 <= len(digits) <= 5
        tiny = [d for d in digits if d["tiny"]]
        assert len(tiny) == 1
        # Tiny: at most a quarter of the smallest other digit's side.
        assert tiny[0]["size"] * 1.25 < min(d["size"] for d in digits if not d["tiny"])


def test_labels_match_the_composed_digits(generated) -> None:
    out, summary = generated
    images, values = mnist_digits()
    index = scan_dataset(out)
    assert index.source == "labels.csv"
    assert index.counts()["train"] and sum(index.counts()["val"].values()) == COUNTS["val"]
    from PIL import Image

    for name, record in summary["canvases"].items():
        digits = record["digits"]
        assert record["sum"] == sum(values[d["index"]] for d in digits)
        assert all(d["value"] == values[d["index"]] for d in digits)
        assert record["label"] == str(bucket(record["sum"]))
        canvas = np.asarray(Image.open(out / name))
        for d in digits:
            # The pixels at each recorded box are exactly the recorded MNIST digit.
            region = canvas[d["y"] : d["y"] + d["size"], d["x"] : d["x"] + d["size"]]
            assert np.array_equal(region, render_digit(images[d["index"]], d["size"]))
        covered = np.zeros_like(canvas, dtype=bool)
        for d in digits:
            covered[d["y"] : d["y"] + d["size"], d["x"] : d["x"] + d["size"]] = True
        assert not canvas[~covered].any()  # nothing else is drawn


def test_no_test_digit_appears_in_a_train_canvas(generated) -> None:
    out, summary = generated
    images, _ = mnist_digits()
    pools = {s: set(p) for s, p in summary["pools"].items()}
    assert not pools["train"] & pools["test"] and not pools["train"] & pools["val"]
    from PIL import Image

    test_digits = sorted(pools["test"])
    for name, record in summary["canvases"].items():
        assert all(d["index"] in pools[record["split"]] for d in record["digits"])
        if record["split"] != "train":
            continue
        canvas = np.asarray(Image.open(out / name))
        for d in record["digits"]:
            region = canvas[d["y"] : d["y"] + d["size"], d["x"] : d["x"] + d["size"]]
            # Checked on the pixels too: no test-pool digit renders to what this box holds.
            rendered = np.stack([render_digit(images[i], d["size"]) for i in test_digits])
            assert not (rendered == region).all(axis=(1, 2)).any()


def test_summary_file_matches_return_value(generated) -> None:
    out, summary = generated
    assert json.loads((out / "digits.json").read_text()) == json.loads(json.dumps(summary))
