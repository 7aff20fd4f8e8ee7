"""Fixtures of the dataset validation tests: a sandbox that shows everything a run leaves behind."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from worker.datasets import DatasetLimits, DatasetReport, validate_upload

from .builders import tree


@dataclass
class Sandbox:
    """An upload folder and a dataset folder nested three levels deep inside one temporary folder,
    so that `../` entries that escaped would land somewhere `tree()` sees."""

    root: Path

    @property
    def upload_dir(self) -> Path:
        path = self.root / "upload"
        path.mkdir(exist_ok=True)
        return path

    @property
    def dataset(self) -> Path:
        return self.root / "box" / "a" / "b" / "ds"

    def validate(self, upload: Path, limits: DatasetLimits | None = None, **kwargs) -> DatasetReport:
        return validate_upload(upload, self.dataset, limits=limits, **kwargs)

    def assert_clean(self, upload: Path) -> None:
        """Only the upload and the (empty) dataset folder remain: no partial extraction, nothing outside."""
        expected = {
            "upload",
            f"upload/{upload.name}",
            "box",
            "box/a",
            "box/a/b",
            "box/a/b/ds",
        }
        assert tree(self.root) == expected
        assert not list(self.root.parent.glob("evil*"))


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    return Sandbox(tmp_path)
