"""Problems found in an upload: each one says which file, what is wrong, and how to fix it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# Every problem code, with the fix a user can make. docs/datasets.md lists the same codes.
HINTS: dict[str, str] = {
    # the upload itself
    "unsupported_upload": "Upload a .zip, .tar, .tar.gz, .tar.bz2 or .tar.xz archive, or a single image "
    "or slide.",
    "corrupt_archive": "The archive is damaged or incomplete: create it again and upload it again.",
    "too_many_files": "Split the dataset, or remove files the dataset does not need.",
    "too_large": "Upload less data, or ask an administrator to raise the limit.",
    "compression_ratio": "Archives of images barely compress; remove the padding or filler files and "
    "create the archive again.",
    "header_too_large": "The archive has an oversized entry header; create it again with a standard tool.",
    # one archive entry
    "unsafe_path": "Use plain relative paths inside the archive (class/image.png), made with a "
    "standard tool.",
    "path_too_long": "Use shorter folder and file names.",
    "link_entry": "Replace links with the files themselves (zip/tar without following-links options).",
    "special_file": "Only regular files and folders belong in a dataset archive; remove it.",
    "nested_archive": "Extract the inner archive and put its files in the outer archive instead.",
    "encrypted_entry": "Create the archive without a password.",
    "unsupported_compression": "Create the archive again with standard (deflate) compression.",
    "duplicate_entry": "Keep one file per path in the archive.",
    # one image
    "unsupported_format": "Use PNG, JPEG, TIFF, or a whole-slide format (SVS, NDPI, SCN, BIF); "
    "remove other files.",
    "empty_file": "The file is empty: export the image again.",
    "content_mismatch": "Export the image again in the format its extension says, or rename it to the "
    "extension of its real format.",
    "image_too_large": "Downscale the image, or save it as a tiled pyramidal TIFF, which is read region "
    "by region.",
    "unsupported_tiff": "Images too large to decode whole are read tile by tile: save them as 8-bit RGB "
    "(or grey) interleaved, tiled pyramidal TIFF.",
    "corrupt_image": "The image is damaged or truncated: export or copy it again.",
    "unreadable_slide": "Check that the slide opens in a viewer (e.g. QuPath) and upload it again.",
    # labels and classes
    "labels_csv": "labels.csv needs a header 'image,label' or 'image,label,split' and one row per image.",
    "missing_file": "Add the file to the archive, or remove its row from labels.csv.",
    "unlabelled_image": "Add a row for the image to labels.csv, or remove the image from the archive.",
    "image_outside_class": "Put every image in the folder of its class (class/image.png), or list it in "
    "labels.csv.",
    "unexpected_folder": "With train/, val/ and test/ folders, put class folders inside them and nothing "
    "next to them.",
    "too_few_classes": "A dataset needs at least two classes: add images of another class.",
    "class_too_small": "Each class needs at least two images: add images or remove the class.",
    "class_without_train": "Each class needs at least one image in the train split.",
    "too_many_problems": "Fix the problems listed first, then upload again to see the rest.",
}


@dataclass(frozen=True)
class Problem:
    """One problem: the path inside the dataset ('' for the whole upload), a code, a message, a hint."""

    path: str
    code: str
    message: str
    hint: str

    def to_dict(self) -> dict[str, str]:
        """JSON-ready form, as the caller stores it."""
        return asdict(self)


def problem(path: str, code: str, message: str, hint: str | None = None) -> Problem:
    """A problem with the standard hint of `code` (unknown codes are a programming error)."""
    if code not in HINTS:
        raise KeyError(f"unknown problem code {code!r}")
    return Problem(path=path, code=code, message=message, hint=hint or HINTS[code])


class ProblemList:
    """Problems in the order found, at most `limit` kept; the rest are counted, not stored."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: list[Problem] = []
        self.dropped = 0

    def add(self, item: Problem) -> None:
        if len(self.items) < self.limit:
            self.items.append(item)
        else:
            self.dropped += 1

    def extend(self, items: list[Problem]) -> None:
        for item in items:
            self.add(item)

    def __bool__(self) -> bool:
        return bool(self.items)

    def __len__(self) -> int:
        return len(self.items) + self.dropped

    def final(self) -> list[Problem]:
        """The kept problems, plus one line saying how many more there were."""
        if not self.dropped:
            return list(self.items)
        more = problem(
            "", "too_many_problems", f"{self.dropped:,} more problem(s) were found but are not listed"
        )
        return [*self.items, more]


class ArchiveRefused(Exception):
    """The archive cannot be used; `problems` says why. Nothing of it is left on disk."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(f"{p.path or 'upload'}: {p.message}" for p in problems[:3]))
        self.problems = problems


class ValidationCancelled(Exception):
    """`should_stop()` answered true; everything written so far has been removed."""
