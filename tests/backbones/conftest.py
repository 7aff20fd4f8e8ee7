"""Weights files built in the test (never committed binaries), and running the backbone jobs."""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm

from backend.config import Settings, get_settings


@pytest.fixture(scope="session")
def resnet18_state() -> dict[str, torch.Tensor]:
    """A randomly initialised torchvision resnet18's state dict, with its 1000-class ``fc`` head."""
    torch.manual_seed(0)
    return tvm.resnet18(weights=None).state_dict()


@pytest.fixture
def weights_dir(tmp_path: Path) -> Path:
    """Where a test writes the files it uploads."""
    folder = tmp_path / "files"
    folder.mkdir()
    return folder


class CreatesFile:
    """Unpickling this calls ``open(path, "w")``: a pickle that runs code when loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str, str]]:
        return (open, (str(self.path), "w"))


def write_code_pickle(dest: Path, victim: Path) -> Path:
    """A .pt file whose loading would create ``victim``."""
    with dest.open("wb") as handle:
        pickle.dump({"conv1.weight": CreatesFile(victim)}, handle)
    return dest


def write_torchscript(dest: Path) -> Path:
    """A TorchScript archive of a tiny module (torch.jit.save)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(dest))
    return dest


@pytest.fixture
def job_settings(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """The test's settings, also seen by the jobs (which read theirs from the environment)."""
    monkeypatch.setenv("TESSERA_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("TESSERA_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("TESSERA_BROKER_URL", settings.broker_url)
    get_settings.cache_clear()
    yield settings
    get_settings.cache_clear()
