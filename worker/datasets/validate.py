"""Validate an uploaded dataset end to end: extract, read the labels, check every image, summarise.

`validate_upload` is what the `datasets.validate` job calls: it takes the stored upload and the
dataset's folder, and returns a `DatasetReport` (ready, with classes, counts, statistics, the
split and thumbnails; or invalid, with every problem). It never touches a database.
"""

from __future__ import annotations

import os
import shutil
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from .archive import ProgressFn, StopFn, archive_kind, extract_archive
from .images import IMAGE_SUFFIXES, ImageInfo, ImageProblem, check_image
from .layout import check_fractions, class_mapping, dataset_root, list_files, read_layout, seeded_split
from .limits import DatasetLimits
from .problems import ArchiveRefused, Problem, ProblemList, ValidationCancelled, problem

IMAGES_DIR = "images"
THUMBNAILS_DIR = "_thumbnails"


@dataclass
class DatasetReport:
    """The outcome of validation, JSON-ready through `to_dict()`.

    Paths are relative POSIX paths under `root` (the folder the images are in, inside the
    dataset folder). `classes[i]` is the name of label i; `labels` and `splits` map every image
    to its class name and split; `thumbnails` lists `{file, class, path}` with `file` relative
    to the dataset folder.
    """

    status: str  # "ready" or "invalid"
    problems: list[Problem] = field(default_factory=list)
    source: str = ""  # "folders", "split_folders", "labels.csv" or "image"
    root: str = ""
    classes: list[str] = field(default_factory=list)
    class_to_index: dict[str, int] = field(default_factory=dict)
    label_kind: str = ""  # "names" or "integers"
    class_counts: dict[str, int] = field(default_factory=dict)
    split_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    split_source: str = ""  # "explicit" or "seeded"
    seed: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    splits: dict[str, str] = field(default_factory=dict)
    image_stats: dict[str, object] = field(default_factory=dict)
    pyramids: list[dict[str, object]] = field(default_factory=list)
    thumbnails: list[dict[str, object]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _image_stats(infos: dict[str, ImageInfo]) -> dict[str, object]:
    widths = [i.width for i in infos.values()]
    heights = [i.height for i in infos.values()]
    formats: dict[str, int] = {}
    for info in infos.values():
        formats[info.format] = formats.get(info.format, 0) + 1
    return {
        "count": len(infos),
        "width": _stats(widths),
        "height": _stats(heights),
        "short_side": _stats([min(i.width, i.height) for i in infos.values()]),
        "long_side": _stats([max(i.width, i.height) for i in infos.values()]),
        "megapixels": {
            k: round(v, 3) for k, v in _stats([i.width * i.height / 1e6 for i in infos.values()]).items()
        },
        "formats": dict(sorted(formats.items())),
    }


def _pyramids(infos: dict[str, ImageInfo]) -> list[dict[str, object]]:
    return [
        {
            "path": rel,
            "format": i.format,
            "levels": [list(level) for level in i.levels],
            "mpp": list(i.mpp) if i.mpp else None,
        }
        for rel, i in infos.items()
        if len(i.levels) > 1 or i.mpp is not None
    ]


def validate_folder(
    root: Path,
    thumbnails_dir: Path,
    limits: DatasetLimits | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> DatasetReport:
    """Validate an extracted dataset folder; thumbnails are written to `thumbnails_dir`.

    Progress is `on_progress(files_checked, files_total, "checking")`; `should_stop()` is
    asked before each file and raises `ValidationCancelled`.
    """
    limits = limits or DatasetLimits()
    check_fractions(val_fraction, test_fraction)
    problems = ProblemList(limits.max_problems)
    start = dataset_root(root)
    files = []
    for rel in list_files(start):
        # Extraction never creates links; a folder validated in place might hold some.
        if (start / rel).is_symlink():
            problems.add(problem(rel, "link_entry", "is a link; links are not followed"))
        else:
            files.append(rel)
    images = [f for f in files if PurePosixPath(f).suffix.lower() in IMAGE_SUFFIXES]
    others = set(files) - set(images) - {"labels.csv"}
    for rel in sorted(others):
        suffix = PurePosixPath(rel).suffix.lower() or "a file without extension"
        problems.add(problem(rel, "unsupported_format", f"{suffix} is not a supported image format"))
    layout = read_layout(start, images, others, "labels.csv" in files)
    problems.extend(layout.problems)
    report = DatasetReport(
        status="invalid", source=layout.source, root=start.relative_to(root).as_posix(), seed=seed
    )

    classes, label_kind = class_mapping(list(layout.labels.values()))
    members: dict[str, list[str]] = {name: [] for name in classes}
    for rel, name in layout.labels.items():
        members[name].append(rel)

    # Check every labelled image; thumbnails for the first few of each class that can have one.
    infos: dict[str, ImageInfo] = {}
    thumbs: list[dict[str, object]] = []
    per_class = dict.fromkeys(classes, 0)
    to_check = sorted(layout.labels)
    thumbnails_dir.mkdir(parents=True, exist_ok=True)
    for done, rel in enumerate(to_check):
        if should_stop is not None and should_stop():
            raise ValidationCancelled("stopped while checking images")
        name = layout.labels[rel]
        target = None
        if per_class[name] < limits.thumbnails_per_class:
            target = thumbnails_dir / f"{len(thumbs)}.jpg"
        try:
            infos[rel] = check_image(start / rel, rel, limits, target)
        except ImageProblem as exc:
            problems.add(exc.problem)
        else:
            if target is not None and target.is_file():
                thumbs.append(
                    {
                        "index": len(thumbs),
                        "file": f"{thumbnails_dir.name}/{target.name}",
                        "class": name,
                        "path": rel,
                    }
                )
                per_class[name] += 1
        if on_progress is not None:
            on_progress(done + 1, len(to_check), "checking")

    # Class rules (on the labels, whatever the images turned out to be); when no label could be
    # read at all, the problems above already say why.
    if len(classes) < 2 and (classes or not problems):
        found = f"found {len(classes)}" + (f" ({classes[0]})" if classes else "")
        problems.add(problem("", "too_few_classes", f"the dataset needs at least 2 classes, {found}"))
    for name in classes:
        if len(members[name]) < 2:
            problems.add(
                problem(
                    name,
                    "class_too_small",
                    f"class {name!r} has {len(members[name])} image(s); at least 2 are needed",
                )
            )
    if layout.splits:
        split_source = "explicit"
        splits = dict(layout.splits)
        for name in classes:
            if not any(splits[rel] == "train" for rel in members[name]):
                problems.add(
                    problem(name, "class_without_train", f"class {name!r} has no image in the train split")
                )
    else:
        split_source = "seeded"
        splits = seeded_split(members, val_fraction, test_fraction, seed) if classes else {}

    if problems:
        report.problems = problems.final()
        return report
    report.status = "ready"
    report.classes = classes
    report.class_to_index = {name: i for i, name in enumerate(classes)}
    report.label_kind = label_kind
    report.class_counts = {name: len(members[name]) for name in classes}
    report.split_counts = {
        split: {name: sum(1 for rel in members[name] if splits[rel] == split) for name in classes}
        for split in ("train", "val", "test")
    }
    report.split_source = split_source
    report.labels = dict(sorted(layout.labels.items()))
    report.splits = dict(sorted(splits.items()))
    report.image_stats = _image_stats(infos)
    report.pyramids = _pyramids(infos)
    report.thumbnails = thumbs
    return report


def validate_upload(
    upload: str | os.PathLike[str],
    dataset_dir: str | os.PathLike[str],
    *,
    filename: str | None = None,
    limits: DatasetLimits | None = None,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> DatasetReport:
    """Extract (or copy) the upload into `dataset_dir/images`, validate it, write thumbnails to
    `dataset_dir/_thumbnails`, and return the report.

    An archive (zip, tar, tar.gz/bz2/xz; recognised by content) is a labelled dataset; any other
    upload must be a single image or slide (`filename` gives its original name and extension)
    and is checked as one unlabelled image (source "image", no classes). When the report is
    invalid, or `ValidationCancelled` is raised, `images/` and `_thumbnails/` are removed again;
    the upload itself is never modified.
    """
    limits = limits or DatasetLimits()
    check_fractions(val_fraction, test_fraction)
    dataset = Path(dataset_dir)
    images_dir, thumbnails_dir = dataset / IMAGES_DIR, dataset / THUMBNAILS_DIR
    for folder in (images_dir, thumbnails_dir):
        if folder.exists():
            raise ValueError(f"{folder} already exists: validate into a fresh dataset folder")
    dataset.mkdir(parents=True, exist_ok=True)

    def clean() -> None:
        shutil.rmtree(images_dir, ignore_errors=True)
        shutil.rmtree(thumbnails_dir, ignore_errors=True)

    try:
        if archive_kind(upload) is not None:
            try:
                extracted = extract_archive(
                    upload, images_dir, limits, on_progress=on_progress, should_stop=should_stop
                )
            except ArchiveRefused as exc:
                return DatasetReport(status="invalid", problems=exc.problems)
            report = validate_folder(
                images_dir,
                thumbnails_dir,
                limits,
                seed=seed,
                val_fraction=val_fraction,
                test_fraction=test_fraction,
                on_progress=on_progress,
                should_stop=should_stop,
            )
            report.ignored = extracted.ignored
        else:
            report = _validate_single(Path(upload), filename, images_dir, thumbnails_dir, limits, on_progress)
    except BaseException:
        clean()
        raise
    if not report.ready:
        clean()
    return report


def _validate_single(
    upload: Path,
    filename: str | None,
    images_dir: Path,
    thumbnails_dir: Path,
    limits: DatasetLimits,
    on_progress: Callable[[int, int | None, str], None] | None,
) -> DatasetReport:
    name = PurePosixPath((filename or upload.name).replace("\\", "/")).name
    if PurePosixPath(name).suffix.lower() not in IMAGE_SUFFIXES or name.startswith("."):
        return DatasetReport(
            status="invalid",
            problems=[
                problem(name, "unsupported_upload", "is neither a zip/tar archive nor a supported image")
            ],
        )
    images_dir.mkdir()
    target = images_dir / name
    try:
        os.link(upload, target)
    except OSError:
        shutil.copyfile(upload, target)
    thumbnails_dir.mkdir()
    thumb = thumbnails_dir / "0.jpg"
    try:
        info = check_image(target, name, limits, thumb)
    except ImageProblem as exc:
        return DatasetReport(status="invalid", source="image", problems=[exc.problem])
    if on_progress is not None:
        on_progress(1, 1, "checking")
    stats = _image_stats({name: info})
    thumbnails = (
        [{"index": 0, "file": f"{THUMBNAILS_DIR}/0.jpg", "class": None, "path": name}]
        if thumb.is_file()
        else []
    )
    return DatasetReport(
        status="ready",
        source="image",
        image_stats=stats,
        pyramids=_pyramids({name: info}),
        thumbnails=thumbnails,
    )
