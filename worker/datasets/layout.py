"""Labels from the folder layout or labels.csv, the class mapping, and the seeded stratified split.

Three layouts: `<class>/<image>` folders; `train|val|test/<class>/<image>` for an explicit
split; or `labels.csv` (image,label[,split]) next to the images. Every problem is collected.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from .engine import SPLITS
from .problems import Problem, problem

_INTEGER = re.compile(r"^[+-]?\d+$")


@dataclass
class Layout:
    """Every image with its label (and split, if the upload gives one), and the files that are not images."""

    source: str  # "folders", "split_folders" or "labels.csv"
    labels: dict[str, str] = field(default_factory=dict)
    splits: dict[str, str] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


def list_files(root: Path) -> list[str]:
    """Every file (and link) under `root` as a sorted relative POSIX path (hidden ones left out)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        base = PurePosixPath(Path(folder).relative_to(root).as_posix())
        # Links to folders are not walked into; they are listed so that they are reported.
        links = [d for d in dirs if os.path.islink(os.path.join(folder, d))]
        names = [n for n in [*files, *links] if not n.startswith(".")]
        found.extend(str(base / name) if str(base) != "." else name for name in names)
    return sorted(found)


def dataset_root(root: Path) -> Path:
    """Where the dataset starts: an archive of one wrapping folder (`mydata/cat/1.png`) is unwrapped."""
    while True:
        entries = [e for e in root.iterdir() if not e.name.startswith(".")]
        if len(entries) != 1 or not entries[0].is_dir() or entries[0].name.lower() in SPLITS:
            return root
        inner = entries[0]
        # One folder holding images directly is a single class, not a wrapper.
        if (
            any(e.is_file() and e.name != "labels.csv" for e in inner.iterdir())
            and not (inner / "labels.csv").is_file()
        ):
            return root
        root = inner


def read_layout(root: Path, files: list[str], others: set[str], has_labels_csv: bool) -> Layout:
    """Labels (and explicit splits) of the image files `files`, with every layout problem.

    `others` are the files that are not images (reported elsewhere; a labels.csv row naming one
    is not reported again).
    """
    if has_labels_csv:
        return _from_labels_csv(root, files, others)
    top = {f.split("/", 1)[0] for f in files if "/" in f}
    if any(name.lower() in SPLITS for name in top):
        return _from_split_folders(files)
    layout = Layout(source="folders")
    for rel in files:
        if "/" not in rel:
            layout.problems.append(
                problem(rel, "image_outside_class", "is not inside a class folder and there is no labels.csv")
            )
            continue
        layout.labels[rel] = rel.split("/", 1)[0]
    return layout


def _from_split_folders(files: list[str]) -> Layout:
    layout = Layout(source="split_folders")
    for rel in files:
        parts = rel.split("/")
        if parts[0].lower() not in SPLITS:
            layout.problems.append(
                problem(rel, "unexpected_folder", f"is outside the {', '.join(SPLITS)} folders")
            )
        elif len(parts) < 3:
            layout.problems.append(
                problem(
                    rel, "image_outside_class", f"is directly in {parts[0]}/, not in a class folder inside it"
                )
            )
        else:
            layout.labels[rel] = parts[1]
            layout.splits[rel] = parts[0].lower()
    return layout


def _from_labels_csv(root: Path, files: list[str], others: set[str]) -> Layout:
    layout = Layout(source="labels.csv")
    try:
        text = (root / "labels.csv").read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        layout.problems.append(problem("labels.csv", "labels_csv", f"is not UTF-8 text ({exc})"))
        return layout
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip().lower() for h in next(reader, [])]
    if "image" not in header or "label" not in header:
        layout.problems.append(
            problem(
                "labels.csv",
                "labels_csv",
                f"the header is {','.join(header) or 'empty'!r}; expected image,label[,split]",
            )
        )
        return layout
    col_image, col_label = header.index("image"), header.index("label")
    col_split = header.index("split") if "split" in header else None
    present = set(files)
    listed: set[str] = set()
    for line, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue
        where = f"labels.csv line {line}"
        if len(row) < len(header):
            layout.problems.append(
                problem(
                    "labels.csv", "labels_csv", f"{where} has {len(row)} column(s), expected {len(header)}"
                )
            )
            continue
        raw, label = row[col_image].strip(), row[col_label].strip()
        rel = "/".join(p for p in raw.replace("\\", "/").split("/") if p not in ("", "."))
        if not raw or not label:
            layout.problems.append(problem("labels.csv", "labels_csv", f"{where}: empty image path or label"))
            continue
        if raw.startswith(("/", "\\")) or ".." in rel.split("/") or re.match(r"^[A-Za-z]:", raw):
            layout.problems.append(
                problem("labels.csv", "labels_csv", f"{where}: {raw!r} is not a path inside the archive")
            )
            continue
        if rel in listed:
            layout.problems.append(problem("labels.csv", "labels_csv", f"{where}: {rel!r} is listed twice"))
            continue
        listed.add(rel)
        if rel in others:
            continue
        if rel not in present:
            layout.problems.append(
                problem(rel, "missing_file", f"is listed in labels.csv ({where}) but not in the archive")
            )
            continue
        if col_split is not None:
            split = row[col_split].strip().lower()
            if split not in SPLITS:
                layout.problems.append(
                    problem(
                        "labels.csv",
                        "labels_csv",
                        f"{where}: split {split!r} is not one of {', '.join(SPLITS)}",
                    )
                )
                continue
            layout.splits[rel] = split
        layout.labels[rel] = label
    for rel in files:
        if rel not in listed:
            layout.problems.append(
                problem(rel, "unlabelled_image", "is in the archive but has no row in labels.csv")
            )
    return layout


def class_mapping(labels: list[str]) -> tuple[list[str], str]:
    """Sorted class names (index = position) and the label kind.

    Integer labels are ordinal classes, sorted by value ("2" before "10"); names sort as text.
    """
    names = sorted(set(labels))
    if names and all(_INTEGER.match(n) for n in names):
        return sorted(names, key=int), "integers"
    return names, "names"


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise ValueError unless both fractions are >= 0 and leave room for training images."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be >= 0 and sum to less than 1")


def seeded_split(
    paths_by_class: dict[str, list[str]], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, str]:
    """A stratified split drawn from `seed` (same files and seed, same split); every class keeps
    at least one training image."""
    check_fractions(val_fraction, test_fraction)
    rng = np.random.default_rng(seed)
    splits: dict[str, str] = {}
    for name in sorted(paths_by_class):
        members = sorted(paths_by_class[name])
        n = len(members)
        n_val, n_test = round(n * val_fraction), round(n * test_fraction)
        while n_val + n_test >= n and (n_val or n_test):
            if n_test >= n_val and n_test:
                n_test -= 1
            else:
                n_val -= 1
        for rank, pos in enumerate(rng.permutation(n)):
            splits[members[pos]] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    return splits
