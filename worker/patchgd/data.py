"""Image input for the PatchGD engine: safe decoding, datasets, resize-once cache, streaming readers.

Everything a user sends is untrusted, so images are opened through `open_image` (format allowlist
checked on the decoded format, pixel limit checked from the header before any pixel is decoded).
Images that fit in memory go through `ImageFolderDataset`, which resizes each image to the model's
resolution once and keeps the result as a memory-mapped uint8 file. Images larger than RAM
(tiled/pyramidal TIFF, whole-slide formats) are read region by region through a `RegionReader`
and fed to the trainer patch by patch by `StreamingPatchSource`.
"""

from __future__ import annotations

import csv
import hashlib
import os
import tempfile
import threading
import warnings
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import tifffile
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from .errors import DatasetError, ImageError
from .grid import PatchGrid, normalize_uint8

# Formats as Pillow names them after decoding. MPO is the multi-picture JPEG written by many
# cameras; it decodes through the JPEG codec.
ALLOWED_FORMATS: frozenset[str] = frozenset({"PNG", "JPEG", "MPO", "TIFF", "BMP", "WEBP"})
# Pillow plugin ids tried when opening (MPO is produced by the JPEG plugin itself).
_OPEN_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP")
# Pillow's own default (~89.5 megapixels, ~9459^2): above this an in-memory decode is refused and
# larger images must be streamed. Pillow refuses anything above twice its process-wide limit by
# itself, so a larger `max_pixels` only helps if that limit is raised too.
DEFAULT_MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
# Streaming readers never hold the whole image, so their limit only guards against absurd headers.
DEFAULT_MAX_STREAM_PIXELS = 1 << 40
# make_loaders(streaming="auto") streams a file above this many pixels (below the in-memory limit).
DEFAULT_STREAM_MIN_PIXELS = 8192 * 8192
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})
SPLITS = ("train", "val", "test")
# Whole-slide formats that only OpenSlide understands (or understands better than tifffile).
_OPENSLIDE_EXTENSIONS = frozenset({".svs", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide"})

# Magic numbers of common non-allowed files, only used to make the refusal message precise.
_KNOWN_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"%PDF", "PDF"),
    (b"PK\x03\x04", "ZIP archive"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"8BPS", "Photoshop PSD"),
    (b"\x7fELF", "executable"),
)


# --------------------------------------------------------------------------- safe decoding


def _sniff(path: Path) -> str | None:
    with open(path, "rb") as fh:
        head = fh.read(16)
    for signature, name in _KNOWN_SIGNATURES:
        if head.startswith(signature):
            return name
    return None


def _open_checked(path: str | os.PathLike[str], max_pixels: int) -> Image.Image:
    """Open lazily (header only), enforce allowlist and pixel limit before any pixel is decoded."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path.name}: file not found")
    try:
        # Pillow's own bomb guard uses a process-wide limit; we enforce `max_pixels` ourselves.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path, formats=_OPEN_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageError(
            f"{path.name}: refused, the declared size exceeds the limit of "
            f"{max_pixels:,} pixels (possible decompression bomb: {exc})"
        ) from exc
    except UnidentifiedImageError as exc:
        kind = _sniff(path)
        allowed = ", ".join(sorted(ALLOWED_FORMATS - {"MPO"}))
        if kind is not None:
            raise ImageError(f"{path.name}: {kind} files are not supported (allowed: {allowed})") from exc
        raise ImageError(f"{path.name}: not a readable image (corrupt, or not one of {allowed})") from exc
    except OSError as exc:
        raise ImageError(f"{path.name}: cannot be read ({exc})") from exc
    if image.format not in ALLOWED_FORMATS:
        fmt = image.format
        image.close()
        raise ImageError(f"{path.name}: format {fmt} is not allowed")
    width, height = image.size
    if width <= 0 or height <= 0:
        image.close()
        raise ImageError(f"{path.name}: empty image ({width}x{height})")
    if width * height > max_pixels:
        image.close()
        raise ImageError(
            f"{path.name}: {width}x{height} = {width * height:,} pixels exceeds the limit of "
            f"{max_pixels:,} pixels (possible decompression bomb; stream large slides as tiled TIFF instead)"
        )
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    # Palette images with a transparent index must go through RGBA, or Pillow warns and guesses.
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits from the real range instead of clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        top = float(array.max()) or 1.0
        image = Image.fromarray(np.round(array * (255.0 / top)).astype(np.uint8), mode="L")
    return image if image.mode == "RGB" else image.convert("RGB")


def open_image(
    path: str | os.PathLike[str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode an untrusted image file into an RGB Pillow image, or raise `ImageError`.

    The format is checked on what Pillow decodes (not the file extension), the pixel count from the
    header before decoding, and truncated or corrupt data is reported instead of half-decoded.
    `draft_size` lets JPEG decode directly at a reduced scale no smaller than that size.
    """
    image = _open_checked(path, max_pixels)
    name = Path(path).name
    try:
        with image:
            if draft_size is not None and image.format in ("JPEG", "MPO"):
                image.draft("RGB", draft_size)
            image.load()
            oriented = ImageOps.exif_transpose(image)
            return _to_rgb(oriented)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{name}: corrupt or truncated image data ({exc})") from exc


def load_resized(
    path: str | os.PathLike[str], image_size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode `path` and resize it to `image_size` x `image_size`; returns uint8 HWC RGB."""
    image = open_image(path, max_pixels=max_pixels, draft_size=(image_size, image_size))
    if image.size != (image_size, image_size):
        # BOX averages every source pixel when shrinking (no aliasing); bilinear when enlarging.
        shrinking = image.width > image_size or image.height > image_size
        resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
        image = image.resize((image_size, image_size), resample)
    return np.array(image, dtype=np.uint8)


def load_level_resized(
    path: str | os.PathLike[str], level: int, image_size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Read pyramid level `level` of `path` whole and resize it to `image_size` x `image_size`.

    Level 0 is decoded like `load_resized`. A higher level of a pyramidal TIFF or whole-slide file
    is read through its region reader (only that level's tiles are decoded); it must exist and hold
    at most `max_pixels` pixels. An ordinary image has level 0 only. Returns uint8 HWC RGB.
    """
    if level == 0:
        return load_resized(path, image_size, max_pixels=max_pixels)
    source = Path(path)
    if not source.is_file():
        raise ImageError(f"{source.name}: file not found")
    if source.suffix.lower() not in _OPENSLIDE_EXTENSIONS and not _is_tiff(source):
        raise ImageError(
            f"{source.name}: pyramid level {level} does not exist "
            "(not a pyramidal image: it has level 0 only)"
        )
    with open_region_reader(source) as reader:
        count = len(reader.level_dimensions)
        if level >= count:
            raise ImageError(
                f"{source.name}: pyramid level {level} does not exist (it has {count} level"
                f"{'s' if count != 1 else ''}, 0 to {count - 1})"
            )
        reader.set_level(level)
        width, height = reader.size
        if width * height > max_pixels:
            raise ImageError(
                f"{source.name}: pyramid level {level} is {width}x{height} = {width * height:,} pixels, "
                f"over the limit of {max_pixels:,} for reading a level whole; choose a smaller level "
                "(a higher level number)"
            )
        pixels = reader.read_region(0, 0, width, height)
    image = Image.fromarray(np.asarray(pixels, dtype=np.uint8))
    if image.size != (image_size, image_size):
        shrinking = image.width > image_size or image.height > image_size
        resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
        image = image.resize((image_size, image_size), resample)
    return np.array(image, dtype=np.uint8)


# --------------------------------------------------------------------------- dataset index


@dataclass(frozen=True)
class Sample:
    """One labelled image of a dataset: path, class index and split name."""

    path: Path
    label: int
    split: str


@dataclass(frozen=True)
class DatasetIndex:
    """A scanned dataset: sorted class names (index = label) and every sample with its split."""

    root: Path
    classes: tuple[str, ...]
    samples: tuple[Sample, ...]
    source: str  # "folders" or "labels.csv"

    def split(self, name: str) -> list[Sample]:
        """The samples of split `name` (train, val or test)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return [s for s in self.samples if s.split == name]

    def counts(self) -> dict[str, dict[str, int]]:
        """Per split, the number of samples of each class (for reports and validation)."""
        table = {split: dict.fromkeys(self.classes, 0) for split in SPLITS}
        for s in self.samples:
            table[s.split][self.classes[s.label]] += 1
        return table


def _is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _safe_relative(root: Path, raw: str, line: int) -> Path:
    """Resolve a csv path strictly inside `root`; absolute paths and `..` are refused."""
    text = raw.strip()
    if not text:
        raise DatasetError(f"labels.csv line {line}: empty image path")
    if "\x00" in text:
        raise DatasetError(f"labels.csv line {line}: image path contains a NUL byte")
    posix, windows = PurePosixPath(text.replace("\\", "/")), PureWindowsPath(text)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or text.startswith(("/", "\\")):
        raise DatasetError(
            f"labels.csv line {line}: absolute path {text!r} refused; use paths relative "
            "to the dataset folder"
        )
    if ".." in posix.parts:
        raise DatasetError(f"labels.csv line {line}: path {text!r} leaves the dataset folder (refused)")
    candidate = (root / posix).resolve()
    # A symlink inside the folder could still point outside it.
    if not candidate.is_relative_to(root.resolve()):
        raise DatasetError(f"labels.csv line {line}: path {text!r} resolves outside the dataset folder")
    return candidate


def _read_labels_csv(root: Path) -> tuple[list[tuple[Path, str, str | None]], bool]:
    rows: list[tuple[Path, str, str | None]] = []
    seen: set[Path] = set()
    missing: list[str] = []
    with open(root / "labels.csv", newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
        absent = [c for c in ("image", "label") if c not in header]
        if absent:
            raise DatasetError(
                f"labels.csv: missing column(s) {', '.join(absent)}; the header must be "
                "'image,label' or 'image,label,split'"
            )
        reader.fieldnames = header
        has_split = "split" in header
        for line, row in enumerate(reader, start=2):
            path = _safe_relative(root, row.get("image") or "", line)
            label = (row.get("label") or "").strip()
            if not label:
                raise DatasetError(f"labels.csv line {line}: empty label")
            split = (row.get("split") or "").strip().lower() if has_split else None
            if has_split and split not in SPLITS:
                raise DatasetError(
                    f"labels.csv line {line}: split {split!r} is not one of {', '.join(SPLITS)}"
                )
            if path in seen:
                raise DatasetError(f"labels.csv line {line}: {row['image'].strip()!r} is listed twice")
            seen.add(path)
            if not path.is_file():
                missing.append(row["image"].strip())
            rows.append((path, label, split))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DatasetError(f"labels.csv lists {len(missing)} file(s) that do not exist: {shown}")
    if not rows:
        raise DatasetError("labels.csv has a header but no rows")
    return rows, has_split


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_classes_in(root: Path, base: Path, split: str | None) -> list[tuple[Path, str, str | None]]:
    """Images of every class sub-folder of `base` (`root` itself or one of its split folders)."""
    folders = _subfolders(base)
    where = f"{base.name}/" if split else "the dataset folder"
    if split and not folders:
        loose = [p.name for p in base.iterdir() if _is_image_file(p)]
        detail = f" (it holds images directly: {', '.join(sorted(loose)[:3])})" if loose else ""
        raise DatasetError(
            f"split folder {where} has no class sub-folders{detail}: put one folder per class in it"
        )
    rows: list[tuple[Path, str, str | None]] = []
    empty = []
    inside = root.resolve()
    for folder in folders:
        files = sorted(p for p in folder.rglob("*") if _is_image_file(p))
        if not files:
            empty.append(f"{base.name}/{folder.name}" if split else folder.name)
        # A symlinked file or folder could expose anything on the host as "training data".
        escaping = [p for p in files if not p.resolve().is_relative_to(inside)]
        if escaping:
            raise DatasetError(
                f"{escaping[0].relative_to(root)} resolves outside the dataset folder (refused)"
            )
        rows.extend((p, folder.name, split) for p in files)
    if empty:
        raise DatasetError(f"class folder(s) without images: {', '.join(empty)}")
    return rows


def _read_class_folders(root: Path) -> tuple[list[tuple[Path, str, str | None]], bool]:
    """Class folders, or split folders (train/, val/, test/) of class folders: (rows, has_split).

    A layout that mixes split folders with other folders, or whose splits disagree on the classes,
    is refused rather than guessed: read naively it would become classes named "train" and "val".
    """
    folders = _subfolders(root)
    if not folders:
        raise DatasetError(
            "no labels.csv and no class sub-folders: put images in one folder per class "
            "or provide labels.csv with columns image,label[,split]"
        )
    split_folders = {p.name.lower(): p for p in folders if p.name.lower() in SPLITS}
    if not split_folders:
        return _read_classes_in(root, root, None), False
    others = [p.name for p in folders if p.name.lower() not in SPLITS]
    if others:
        raise DatasetError(
            f"the dataset folder mixes split folders ({', '.join(p.name for p in split_folders.values())}) "
            f"with other folders ({', '.join(others)}): either put every class folder inside "
            "train/ (and val/, test/), or use class folders only"
        )
    if len(split_folders) != len([p for p in folders if p.name.lower() in SPLITS]):
        raise DatasetError("split folders differ only in letter case: keep one train/, val/ and test/")
    if "train" not in split_folders:
        raise DatasetError(
            f"split folder(s) {', '.join(p.name + '/' for p in split_folders.values())} but no "
            "train/ folder: the training images go in train/<class>/"
        )
    rows: list[tuple[Path, str, str | None]] = []
    classes: dict[str, set[str]] = {}
    for split in SPLITS:
        if split in split_folders:
            split_rows = _read_classes_in(root, split_folders[split], split)
            classes[split] = {label for _, label, _ in split_rows}
            rows.extend(split_rows)
    for split, names in classes.items():
        if names != classes["train"]:
            extra, lacking = sorted(names - classes["train"]), sorted(classes["train"] - names)
            parts = [f"class(es) not in train/: {', '.join(extra)}"] if extra else []
            parts += [f"no folder for class(es) {', '.join(lacking)}"] if lacking else []
            raise DatasetError(
                f"{split_folders[split].name}/ has other classes than train/: {'; '.join(parts)}"
            )
    return rows, True


def _stratified_splits(
    labels: Sequence[int], num_classes: int, val_fraction: float, test_fraction: float, seed: int
) -> list[str]:
    """Deterministic per-class split; every class keeps at least one training image."""
    rng = np.random.default_rng(seed)
    splits = ["train"] * len(labels)
    for cls in range(num_classes):
        members = [i for i, y in enumerate(labels) if y == cls]
        order = rng.permutation(len(members))
        n = len(members)
        n_val = int(round(n * val_fraction))
        n_test = int(round(n * test_fraction))
        while n_val + n_test >= n and (n_val or n_test):
            if n_test >= n_val and n_test:
                n_test -= 1
            else:
                n_val -= 1
        for rank, pos in enumerate(order):
            if rank < n_val:
                splits[members[pos]] = "val"
            elif rank < n_val + n_test:
                splits[members[pos]] = "test"
    return splits


def scan_dataset(
    root: str | os.PathLike[str],
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> DatasetIndex:
    """Index a dataset folder: `labels.csv` (image,label[,split]) if present, else class sub-folders.

    Class folders may sit inside split folders, ``train/<class>/`` with ``val/<class>/`` and/or
    ``test/<class>/``: those folders then are the split. Class names are sorted and mapped to label
    indices. Without a split column or split folders, a stratified split is drawn from `seed` (same
    seed, same split). Ambiguous layouts (split folders next to class folders, splits with other
    classes than train/) are refused. Raises `DatasetError` with a readable message.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise DatasetError(f"dataset folder {root_path} does not exist")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DatasetError("val_fraction and test_fraction must be in [0, 1) and sum to less than 1")
    csv_path = root_path / "labels.csv"
    rows: Sequence[tuple[Path, str, str | None]]
    if csv_path.is_file():
        rows, has_split = _read_labels_csv(root_path)
        source = "labels.csv"
    else:
        rows, has_split = _read_class_folders(root_path)
        source = "folders"
    classes = tuple(sorted({label for _, label, _ in rows}))
    if len(classes) < 2:
        raise DatasetError(f"need at least two classes, found {len(classes)}: {', '.join(classes)}")
    index = {name: i for i, name in enumerate(classes)}
    labels = [index[label] for _, label, _ in rows]
    if has_split:
        splits = [split or "train" for _, _, split in rows]
    else:
        splits = _stratified_splits(labels, len(classes), val_fraction, test_fraction, seed)
    trained = {classes[y] for y, split in zip(labels, splits, strict=True) if split == "train"}
    no_train = sorted(set(classes) - trained)
    if no_train:
        raise DatasetError(f"class(es) without any training image: {', '.join(no_train)}")
    samples = tuple(Sample(path, y, s) for (path, _, _), y, s in zip(rows, labels, splits, strict=True))
    return DatasetIndex(root=root_path, classes=classes, samples=samples, source=source)


# --------------------------------------------------------------------------- resize-once cache


class ImageFolderDataset(Dataset):
    """Labelled images resized once to `image_size` and served from a memory-mapped uint8 cache.

    The first access of an image decodes and resizes it and writes `<cache_dir>/<key>.npy`, the key
    hashing the source path, its mtime and size, `image_size` and `level`; a changed file gets a new
    key. With `level`, pyramidal images are read from that pyramid level (`load_level_resized`).
    Later epochs only memory-map that file: no decoding, no resizing. Items are
    (normalized float32 [3, S, S], label).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int,
        cache_dir: str | os.PathLike[str],
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        level: int | None = None,
    ) -> None:
        if image_size <= 0:
            raise ValueError("image_size must be positive")
        if level is not None and level < 0:
            raise ValueError("level must be 0 or more")
        self.samples = list(samples)
        self.image_size = image_size
        self.level = level
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.max_pixels = max_pixels
        # Number of decodes done by this process: lets callers (and tests) see that the cache works.
        self.decodes = 0

    def __len__(self) -> int:
        return len(self.samples)

    def cache_path(self, sample: Sample) -> Path:
        """Where the resized copy of `sample` lives; changes when the source file changes."""
        stat = sample.path.stat()
        key = f"{sample.path.resolve()}|{stat.st_mtime_ns}|{stat.st_size}|{self.image_size}"
        if self.level:
            key += f"|level={self.level}"
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.cache_dir / digest[:2] / f"{digest}.npy"

    def resized_uint8(self, index: int) -> np.ndarray:
        """The HWC uint8 resized image of item `index`, from the cache (decoding only on a miss)."""
        sample = self.samples[index]
        target = self.cache_path(sample)
        if not target.is_file():
            if self.level:
                array = load_level_resized(
                    sample.path, self.level, self.image_size, max_pixels=self.max_pixels
                )
            else:
                array = load_resized(sample.path, self.image_size, max_pixels=self.max_pixels)
            self.decodes += 1
            target.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename: a concurrent reader (another DataLoader worker) never sees half a file.
            fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    np.save(fh, array)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return np.load(target, mmap_mode="r")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        array = self.resized_uint8(index)
        # Copy out of the read-only map: torch tensors must own writable memory.
        return normalize_uint8(np.array(array, copy=True)), self.samples[index].label


def make_loaders(
    index: DatasetIndex,
    *,
    image_size: int,
    batch_size: int,
    cache_dir: str | os.PathLike[str],
    seed: int = 0,
    num_workers: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    drop_last: bool = False,
    streaming: bool | str = False,
    patch_size: int | None = None,
    level: int | None = None,
    target_size: int | None = None,
    stream_min_pixels: int = DEFAULT_STREAM_MIN_PIXELS,
) -> dict[str, DataLoader]:
    """Torch DataLoaders for the train/val/test splits of `index` (empty splits are left out).

    The training loader shuffles with a generator seeded from `seed`, so the same seed gives the
    same batch order; evaluation loaders keep the index order.

    `streaming` chooses how images reach PatchGD: False resizes each image once into the cache
    (batches of tensors); True streams every split through region reads (batches of
    `StackedPatchSource`, see `StreamingImageDataset`; the PatchGD grid needs `patch_size`, the
    level is `level` or the smallest one at least `target_size`, default `image_size`); "auto"
    streams a split when any of its files `needs_streaming` (pyramidal, whole-slide, or above
    `stream_min_pixels`). Streamed batches are for PatchGD only (the baseline needs tensors).
    Images resized into the cache are read from pyramid level `level` when it is given (see
    `load_level_resized`), else from level 0.
    """
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    if streaming not in (False, True, "auto"):
        raise ValueError(f"streaming must be true, false or 'auto', got {streaming!r}")
    if streaming and patch_size is None:
        raise ValueError("streaming needs the PatchGD patch_size to lay the patch grid over each file")
    loaders: dict[str, DataLoader] = {}
    for split in SPLITS:
        samples = index.split(split)
        if not samples:
            continue
        stream = streaming is True or (
            streaming == "auto" and any(needs_streaming(s.path, stream_min_pixels) for s in samples)
        )
        dataset: Dataset
        if stream:
            dataset = StreamingImageDataset(
                samples,
                PatchGrid(image_size, patch_size),
                level=level,
                target_size=target_size,  # type: ignore[arg-type]
            )
        else:
            dataset = ImageFolderDataset(samples, image_size, cache_dir, max_pixels=max_pixels, level=level)
        generator = torch.Generator().manual_seed(seed)
        loaders[split] = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=split == "train",
            generator=generator,
            num_workers=num_workers,
            drop_last=drop_last and split == "train",
            persistent_workers=num_workers > 0,
            collate_fn=collate_patch_sources if stream else None,
        )
    return loaders


# --------------------------------------------------------------------------- region readers


def best_level_for(level_dimensions: Sequence[tuple[int, int]], target_size: int) -> int:
    """Index of the smallest pyramid level whose width and height are both >= `target_size`.

    Falls back to level 0 (the largest) when no level is that big.
    """
    best = 0
    for level, (width, height) in enumerate(level_dimensions):
        if (
            width >= target_size
            and height >= target_size
            and width * height <= (level_dimensions[best][0] * level_dimensions[best][1])
        ):
            best = level
    return best


class RegionReader(ABC):
    """Reads rectangular RGB regions of one level of a (possibly huge) image without loading it all."""

    level_dimensions: tuple[tuple[int, int], ...]
    level: int

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the chosen level."""
        return self.level_dimensions[self.level]

    def best_level_for(self, target_size: int) -> int:
        """The smallest level of this image that is still >= `target_size` on both sides."""
        return best_level_for(self.level_dimensions, target_size)

    def set_level(self, level: int) -> None:
        """Choose the pyramid level that `read_region` and `size` refer to."""
        if not 0 <= level < len(self.level_dimensions):
            raise ValueError(f"level {level} does not exist (this image has {len(self.level_dimensions)})")
        self.level = level

    def _check_region(self, x: int, y: int, w: int, h: int) -> None:
        width, height = self.size
        if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > width or y + h > height:
            raise ValueError(
                f"region x={x} y={y} w={w} h={h} is outside the {width}x{height} level {self.level}"
            )

    @abstractmethod
    def read_region(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Pixels [y:y+h, x:x+w] of the chosen level as uint8 [h, w, 3]."""

    @abstractmethod
    def close(self) -> None:
        """Release the file handle and any cached pixels."""

    def __enter__(self) -> RegionReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TiffRegionReader(RegionReader):
    """Region reads from a tiled (or stripped) TIFF pyramid via tifffile, decoding only the
    segments that overlap the region; a small LRU of decoded segments serves neighbouring reads."""

    def __init__(self, path: Path, *, cache_bytes: int = 32 << 20) -> None:
        self._tif = tifffile.TiffFile(path)
        self._lock = threading.Lock()
        try:
            series = self._tif.series[0]
            pages = [level.keyframe for level in series.levels]
            for page in pages:
                self._check_page(page, path)
        except Exception:
            self._tif.close()
            raise
        self._pages = pages
        self.level_dimensions = tuple((int(p.imagewidth), int(p.imagelength)) for p in pages)
        self.level = 0
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached = 0

    @staticmethod
    def _check_page(page, path: Path) -> None:
        if page.dtype != np.uint8 or page.planarconfig != 1 or page.imagedepth != 1:
            raise ImageError(f"{path.name}: only 8-bit interleaved TIFF images can be streamed")
        # Grey, RGB and YCbCr (decoded to RGB by the JPEG codec); palette or inverted grey would
        # need a colour conversion that training data should not depend on.
        if int(page.photometric) not in (1, 2, 6):
            raise ImageError(f"{path.name}: TIFF photometric {page.photometric.name} cannot be streamed")
        if page.samplesperpixel not in (1, 3, 4):
            raise ImageError(f"{path.name}: {page.samplesperpixel} samples per pixel are not supported")

    def _segment_shape(self, page) -> tuple[int, int]:
        if page.is_tiled:
            return int(page.tilelength), int(page.tilewidth)
        return int(min(page.rowsperstrip, page.imagelength)), int(page.imagewidth)

    def _segment(self, level: int, index: int) -> np.ndarray:
        key = (level, index)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        page = self._pages[level]
        seg_h, seg_w = self._segment_shape(page)
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        if count == 0:
            data = np.zeros((seg_h, seg_w, page.samplesperpixel), np.uint8)
        else:
            fh = self._tif.filehandle
            with fh.lock:
                fh.seek(offset)
                raw = fh.read(count)
            decoded, _, _ = page.decode(raw, index, jpegtables=page.jpegtables)
            data = np.asarray(decoded).reshape(decoded.shape[1], decoded.shape[2], -1)
        self._cache[key] = data
        self._cached += data.nbytes
        while self._cached > self._cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= old.nbytes
        return data

    def read_region(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        self._check_region(x, y, w, h)
        page = self._pages[self.level]
        seg_h, seg_w = self._segment_shape(page)
        per_row = -(-int(page.imagewidth) // seg_w)
        channels = page.samplesperpixel
        out = np.empty((h, w, channels), np.uint8)
        with self._lock:
            for ty in range(y // seg_h, (y + h - 1) // seg_h + 1):
                for tx in range(x // seg_w, (x + w - 1) // seg_w + 1):
                    seg = self._segment(self.level, ty * per_row + tx)
                    y0, x0 = ty * seg_h, tx * seg_w
                    sy, sx = max(y, y0), max(x, x0)
                    ey, ex = min(y + h, y0 + seg.shape[0]), min(x + w, x0 + seg.shape[1])
                    out[sy - y : ey - y, sx - x : ex - x] = seg[sy - y0 : ey - y0, sx - x0 : ex - x0]
        if channels == 1:
            return np.repeat(out, 3, axis=2)
        return np.ascontiguousarray(out[:, :, :3])

    def close(self) -> None:
        self._cache.clear()
        self._tif.close()


class OpenSlideRegionReader(RegionReader):
    """Region reads through OpenSlide (SVS, NDPI, MRXS, SCN, generic tiled TIFF, ...)."""

    def __init__(self, path: Path) -> None:
        # Imported here: it loads the native OpenSlide library, which only this reader needs.
        import openslide

        try:
            self._slide = openslide.OpenSlide(str(path))
        except openslide.OpenSlideError as exc:
            raise ImageError(f"{path.name}: OpenSlide cannot read this slide ({exc})") from exc
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
        self._downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.level = 0

    def read_region(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        self._check_region(x, y, w, h)
        scale = self._downsamples[self.level]
        # OpenSlide takes the location in level-0 pixels and the size in level pixels.
        rgba = self._slide.read_region((int(round(x * scale)), int(round(y * scale))), self.level, (w, h))
        rgb = np.asarray(rgba, dtype=np.uint8)[:, :, :3]
        return np.ascontiguousarray(rgb)

    def close(self) -> None:
        self._slide.close()


class PillowRegionReader(RegionReader):
    """A single-level reader over an ordinary image that fits in memory (PNG, JPEG, ...)."""

    def __init__(self, path: Path, *, max_pixels: int) -> None:
        self._array = np.asarray(open_image(path, max_pixels=max_pixels), dtype=np.uint8)
        self.level_dimensions = ((self._array.shape[1], self._array.shape[0]),)
        self.level = 0

    def read_region(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        self._check_region(x, y, w, h)
        return np.ascontiguousarray(self._array[y : y + h, x : x + w])

    def close(self) -> None:
        self._array = np.empty((0, 0, 3), np.uint8)


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def open_region_reader(
    path: str | os.PathLike[str],
    *,
    level: int | None = None,
    target_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_STREAM_PIXELS,
    backend: str | None = None,
) -> RegionReader:
    """Open an image for region reads, choosing the backend from its content and extension.

    Whole-slide formats (SVS, NDPI, MRXS, ...) go to OpenSlide; tiled or pyramidal TIFF to
    tifffile (segment-level reads, nothing else decoded); other allowed formats to Pillow (the
    image is decoded, so `max_pixels` of the in-memory limit applies). `backend` forces
    "tifffile", "openslide" or "pillow". The level is `level`, else the smallest level >=
    `target_size`, else 0. Level-0 pixel counts above `max_pixels` are refused.
    """
    source = Path(path)
    if not source.is_file():
        raise ImageError(f"{source.name}: file not found")
    if backend is None:
        if source.suffix.lower() in _OPENSLIDE_EXTENSIONS:
            backend = "openslide"
        elif _is_tiff(source):
            backend = "tifffile"
        else:
            backend = "pillow"
    reader: RegionReader
    if backend == "openslide":
        reader = OpenSlideRegionReader(source)
    elif backend == "tifffile":
        try:
            reader = TiffRegionReader(source)
        except (tifffile.TiffFileError, ValueError, IndexError, OSError) as exc:
            if isinstance(exc, ImageError):
                raise
            raise ImageError(f"{source.name}: not a readable TIFF ({exc})") from exc
    elif backend == "pillow":
        reader = PillowRegionReader(source, max_pixels=min(max_pixels, DEFAULT_MAX_PIXELS))
    else:
        raise ValueError(f"unknown backend {backend!r}; expected tifffile, openslide or pillow")
    width, height = reader.level_dimensions[0]
    if width * height > max_pixels:
        reader.close()
        raise ImageError(f"{source.name}: {width}x{height} exceeds the limit of {max_pixels:,} pixels")
    if level is not None:
        try:
            reader.set_level(level)
        except ValueError:
            reader.close()
            raise
    elif target_size is not None:
        reader.set_level(reader.best_level_for(target_size))
    return reader


# --------------------------------------------------------------------------- streaming source


class StreamingPatchSource:
    """PatchSource for ONE large image read region by region (batch size 1).

    The model's S x S grid of n x n patches is laid over the whole chosen level of the image: patch
    (row, col) covers level pixels [row*H/n, (row+1)*H/n) x [col*W/n, (col+1)*W/n), which is read
    and resized to P x P. The image is never materialised, so host memory is bounded by the
    patches in flight (plus the reader's small segment cache).
    """

    batch_size = 1

    def __init__(self, reader: RegionReader, grid: PatchGrid) -> None:
        width, height = reader.size
        if width < grid.n or height < grid.n:
            raise ValueError(
                f"level {reader.level} is {width}x{height}, smaller than the {grid.n}x{grid.n} grid"
            )
        self.reader = reader
        self.grid = grid
        self.patch_size = int(grid.patch_size)
        self._xs = [round(i * width / grid.n) for i in range(grid.n + 1)]
        self._ys = [round(i * height / grid.n) for i in range(grid.n + 1)]

    def region(self, index: int) -> tuple[int, int, int, int]:
        """(x, y, w, h) in level pixels of patch `index` (row-major)."""
        row, col = self.grid.coords(int(index))
        x0, x1 = self._xs[col], self._xs[col + 1]
        y0, y1 = self._ys[row], self._ys[row + 1]
        return x0, y0, x1 - x0, y1 - y0

    def patch_uint8(self, index: int) -> np.ndarray:
        """Patch `index` as uint8 [P, P, 3], read from its region only."""
        x, y, w, h = self.region(index)
        pixels = self.reader.read_region(x, y, w, h)
        size = self.patch_size
        if (w, h) == (size, size):
            return pixels
        shrinking = w > size or h > size
        resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
        return np.asarray(Image.fromarray(pixels).resize((size, size), resample), dtype=np.uint8)

    def patches(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Normalized float32 patches [1, k, 3, P, P] for `indices` ([k] or [1, k])."""
        flat = torch.as_tensor(indices)
        if flat.dim() == 2 and flat.shape[0] == 1:
            flat = flat[0]
        if flat.dim() != 1:
            raise ValueError("a streaming source holds one image; indices must be [k] or [1, k]")
        stacked = np.stack([self.patch_uint8(int(i)) for i in flat.tolist()])
        return normalize_uint8(stacked).unsqueeze(0)


# --------------------------------------------------------------------------- streaming datasets


def needs_streaming(path: str | os.PathLike[str], min_pixels: int = DEFAULT_STREAM_MIN_PIXELS) -> bool:
    """Whether an image should be streamed rather than decoded whole: a whole-slide file (OpenSlide
    format), a pyramidal TIFF (more than one level), or more than `min_pixels` pixels at level 0.

    Only headers are read.
    """
    source = Path(path)
    if source.suffix.lower() in _OPENSLIDE_EXTENSIONS:
        return True
    try:
        if _is_tiff(source):
            with tifffile.TiffFile(source) as tif:
                series = tif.series[0]
                if len(series.levels) > 1:
                    return True
                page = series.levels[0].pages[0]
                return int(page.imagewidth) * int(page.imagelength) > min_pixels
        with Image.open(source) as image:
            width, height = image.size
    except (OSError, ValueError, IndexError, tifffile.TiffFileError, UnidentifiedImageError) as exc:
        raise ImageError(f"{source.name}: cannot read the image header ({exc})") from exc
    return width * height > min_pixels


class FilePatchSource:
    """A PatchSource for ONE image file, opened for region reads on first use (batch size 1).

    Cheap to create and to pickle (a path and options), so a Dataset can hand it out from
    DataLoader worker processes; the reader is opened in the process that reads patches. The
    level is `level`, else the smallest level at least `target_size` (default: the grid's image
    size) on its short side. See `StreamingPatchSource` for how the grid is laid over the level.
    """

    batch_size = 1

    def __init__(
        self,
        path: str | os.PathLike[str],
        grid: PatchGrid,
        *,
        level: int | None = None,
        target_size: int | None = None,
        max_pixels: int = DEFAULT_MAX_STREAM_PIXELS,
        backend: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.grid = grid
        self.level = level
        self.target_size = grid.image_size if target_size is None and level is None else target_size
        self.max_pixels = max_pixels
        self.backend = backend
        self._source: StreamingPatchSource | None = None

    def open(self) -> StreamingPatchSource:
        """The underlying streaming source (opening the file the first time)."""
        if self._source is None:
            reader = open_region_reader(
                self.path,
                level=self.level,
                target_size=self.target_size,
                max_pixels=self.max_pixels,
                backend=self.backend,
            )
            try:
                self._source = StreamingPatchSource(reader, self.grid)
            except BaseException:
                reader.close()
                raise
        return self._source

    def patches(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Normalized float32 patches [1, k, 3, P, P] for `indices` ([k] or [1, k])."""
        return self.open().patches(indices)

    def close(self) -> None:
        """Close the file (it is reopened if patches are asked for again)."""
        if self._source is not None:
            self._source.reader.close()
            self._source = None

    def __getstate__(self) -> dict:
        # An open reader holds a file handle: a copy sent to another process opens its own.
        return {**self.__dict__, "_source": None}


class StackedPatchSource:
    """A PatchSource for a batch of per-image sources (e.g. several streamed files).

    Patch requests go to every image: `[k]` indices are the same positions in each, `[B, k]` gives
    row i to image i. The result `[B, k, C, P, P]` is what the PatchGD loop encodes as one batch of
    B * k patches, so several streamed images train together in every inner iteration.
    """

    def __init__(self, sources: Sequence) -> None:
        if not sources:
            raise ValueError("a stacked source needs at least one image")
        grids = {source.grid for source in sources}
        if len(grids) != 1:
            raise ValueError("every image of a batch must use the same patch grid")
        self.sources = list(sources)
        self.grid = self.sources[0].grid
        self.batch_size = sum(source.batch_size for source in self.sources)

    def patches(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Normalized float32 patches [B, k, C, P, P] for `indices` ([k] or [B, k])."""
        indices = torch.as_tensor(indices)
        if indices.dim() == 1:
            return torch.cat([source.patches(indices) for source in self.sources])
        if indices.dim() != 2 or indices.shape[0] != self.batch_size:
            raise ValueError(f"indices must be [k] or [{self.batch_size}, k], got {tuple(indices.shape)}")
        parts, row = [], 0
        for source in self.sources:
            parts.append(source.patches(indices[row : row + source.batch_size]))
            row += source.batch_size
        return torch.cat(parts)

    def close(self) -> None:
        """Close every image that can be closed."""
        for source in self.sources:
            close = getattr(source, "close", None)
            if close is not None:
                close()


class StreamingImageDataset(Dataset):
    """Labelled image files served as `(FilePatchSource, label)`: nothing is decoded up front.

    For files too large (or too pyramidal) to resize in memory. Batch the items with
    `collate_patch_sources` (what `make_loaders(..., streaming=...)` does) to get
    `(StackedPatchSource, labels)` batches that `train` and `predict` accept like image tensors.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        grid: PatchGrid,
        *,
        level: int | None = None,
        target_size: int | None = None,
        max_pixels: int = DEFAULT_MAX_STREAM_PIXELS,
        backend: str | None = None,
    ) -> None:
        self.samples = list(samples)
        self.grid = grid
        self.options = {
            "level": level,
            "target_size": target_size,
            "max_pixels": max_pixels,
            "backend": backend,
        }

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[FilePatchSource, int]:
        sample = self.samples[index]
        return FilePatchSource(sample.path, self.grid, **self.options), sample.label


def collate_patch_sources(items: Sequence[tuple[object, int]]) -> tuple[StackedPatchSource, torch.Tensor]:
    """DataLoader collate function for `StreamingImageDataset`: one stacked source and the labels."""
    sources, labels = zip(*items, strict=True)
    return StackedPatchSource(sources), torch.tensor(labels, dtype=torch.long)
