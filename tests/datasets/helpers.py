"""Small archives for the datasets domain tests, made in the test (nothing committed)."""

from __future__ import annotations

import io
import zipfile

from tests.datasets_worker.builders import good_entries


def good_zip(classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 3) -> bytes:
    """A valid class-folder dataset as zip bytes (tiny PNGs)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in good_entries(classes, per_class).items():
            archive.writestr(name, data)
    return buffer.getvalue()


def bad_zip() -> bytes:
    """A zip with one class only, a text file and a PNG that is not one."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in good_entries(("cat",), 2).items():
            archive.writestr(name, data)
        archive.writestr("cat/notes.txt", b"hello")
        archive.writestr("cat/broken.png", b"not a png at all")
    return buffer.getvalue()
