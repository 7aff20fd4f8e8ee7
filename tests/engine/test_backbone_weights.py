"""Judging uploaded weights without running them, and mapping them onto a catalog trunk."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
from safetensors.torch import load_file

from worker.patchgd.backbones import WeightsMismatch, WeightsRefused, check_weights, sniff_weights


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return tvm.mobilenet_v3_small(weights=None).state_dict()


def test_nested_wrapper_prefixes_and_another_class_count_head(state: dict, tmp_path: Path) -> None:
    wrapped = {f"model.backbone.{k}": v for k, v in state.items() if not k.startswith("classifier.3.")}
    wrapped["model.backbone.classifier.3.weight"] = torch.zeros(7, 1024)
    wrapped["model.backbone.classifier.3.bias"] = torch.zeros(7)
    source = tmp_path / "w.bin"
    torch.save({"epoch": 3, "state_dict": wrapped}, source)

    checked = check_weights("mobilenet_v3_small", source, tmp_path / "out.safetensors")

    assert checked.details["stripped_prefixes"] == ["model.", "backbone."]
    assert checked.details["dropped_head"]["classes"] == 7
    stored = load_file(str(tmp_path / "out.safetensors"))
    assert not any(k.startswith("classifier.") for k in stored)
    assert torch.equal(stored["features.0.0.weight"], state["features.0.0.weight"])


def test_legacy_torch_save_format_and_missing_batchnorm_counters(state: dict, tmp_path: Path) -> None:
    source = tmp_path / "old.pth"
    trimmed = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(trimmed, source, _use_new_zipfile_serialization=False)

    checked = check_weights("mobilenet_v3_small", source, tmp_path / "out.safetensors")

    assert checked.details["filled_batchnorm_counters"] > 0


def test_non_finite_weights_are_a_mismatch(state: dict, tmp_path: Path) -> None:
    broken = dict(state)
    broken["features.0.0.weight"] = torch.full_like(state["features.0.0.weight"], float("nan"))
    source = tmp_path / "nan.pt"
    torch.save(broken, source)

    with pytest.raises(WeightsMismatch, match="NaN or infinite"):
        check_weights("mobilenet_v3_small", source, tmp_path / "out.safetensors")
    assert list(tmp_path.glob("out*")) == []


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "empty"),
        (b"\x7fELF\x02\x01\x01" + bytes(64), "program"),
        (b"#!/bin/sh\nrm -rf /\n", "program"),
        (b"just some text, not weights", "neither safetensors nor"),
    ],
)
def test_files_that_are_not_weights_are_refused_by_their_bytes(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "w.pt"
    path.write_bytes(content)
    with pytest.raises(WeightsRefused, match=message):
        sniff_weights(path)


def test_a_zip_that_torch_did_not_write_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(WeightsRefused, match="not one written by torch.save"):
        sniff_weights(path)


class _System:
    def __reduce__(self) -> tuple:
        import os

        return (os.system, ("true",))


def test_a_pickle_naming_os_system_is_refused_before_loading(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    path.write_bytes(pickle.dumps({"w": _System()}, protocol=2))
    with pytest.raises(WeightsRefused, match=r"would call (posix|os|nt)\.system"):
        sniff_weights(path)


def test_a_mapping_with_non_tensor_entries_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({"conv1.weight": torch.zeros(1), "note": "hello"}, path)
    with pytest.raises(WeightsRefused, match="not tensors"):
        check_weights("resnet18", path, tmp_path / "out.safetensors")
