"""Checkpoints: atomic writes, safe loading, and resume that continues exactly."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from worker.patchgd.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from worker.patchgd.config import BaselineConfig, ConfigError, PatchGDConfig
from worker.patchgd.models import build_baseline_model
from worker.patchgd.train import Progress, train


def _loaders() -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(5)
    images = torch.randn(12, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 3, (12,), generator=generator)
    dataset = TensorDataset(images, labels)
    # Shuffled with the loader's own generator; the last batch is smaller (12 = 5 + 5 + 2).
    return (
        DataLoader(dataset, batch_size=5, shuffle=True, generator=torch.Generator()),
        DataLoader(TensorDataset(images[:4], labels[:4]), batch_size=4),
    )


CONFIGS = {
    # Reference head (Dropout2d draws from the global RNG), per-image positions (sampler RNG) and
    # the stale-Z regime (several optimizer steps per outer step).
    "patchgd": PatchGDConfig(
        num_classes=3,
        backbone="mobilenet_v3_small",
        image_size=32,
        patch_size=8,
        sampling=0.25,
        accumulation_steps=2,
        latent_dim=8,
        head_width=8,
        epochs=3,
        batch_size=5,
        warmup_epochs=1,
        per_image_positions=True,
        seed=3,
    ),
    "baseline": BaselineConfig(
        num_classes=3, backbone="resnet18", image_size=32, epochs=3, batch_size=5, seed=3
    ),
}


def _run(cfg, **kwargs):  # noqa: ANN001, ANN202 - test helper
    losses: list[float] = []
    train_loader, val_loader = _loaders()
    record = lambda p: p.phase == "train" and losses.append(p.loss)  # noqa: E731 - training steps only
    result = train(cfg, train_loader, val_loader, device="cpu", on_progress=record, **kwargs)
    return result, losses


@pytest.mark.parametrize("algorithm", sorted(CONFIGS))
def test_resume_equals_uninterrupted(tmp_path: Path, algorithm: str) -> None:
    cfg = CONFIGS[algorithm]
    straight, straight_losses = _run(cfg)
    # Stop after 2 of 3 epochs (3 batches per epoch), then continue in a fresh call.
    first, first_losses = _run(cfg, checkpoint_dir=tmp_path, max_steps=6)
    assert first.status == "stopped" and first.epochs_completed == 2
    resumed, resumed_losses = _run(cfg, checkpoint_dir=tmp_path, resume_from=tmp_path / "last.pt")
    assert resumed.status == "succeeded" and resumed.steps == 9
    assert first_losses + resumed_losses == straight_losses
    assert [m.to_dict() for m in resumed.history][:2] == [m.to_dict() for m in first.history]
    assert [m.train_loss for m in resumed.history] == [m.train_loss for m in straight.history]
    assert resumed.final == straight.final
    straight_state, resumed_state = straight.model.state_dict(), resumed.model.state_dict()
    assert straight_state.keys() == resumed_state.keys()
    for name, value in straight_state.items():
        assert torch.equal(value, resumed_state[name]), name


def test_resume_refuses_other_hyperparameters(tmp_path: Path) -> None:
    cfg = CONFIGS["baseline"]
    _run(cfg, checkpoint_dir=tmp_path, max_steps=3)
    changed = BaselineConfig(**{**cfg.to_dict(), "lr": 0.5})
    with pytest.raises(CheckpointError, match="different hyperparameters: lr"):
        _run(changed, resume_from=tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="checkpoint is for baseline, this run is patchgd"):
        _run(CONFIGS["patchgd"], resume_from=tmp_path / "last.pt")


def test_progress_is_reported_for_resumed_runs(tmp_path: Path) -> None:
    cfg = CONFIGS["baseline"]
    _run(cfg, checkpoint_dir=tmp_path, max_steps=3)
    seen: list[Progress] = []
    train_loader, _ = _loaders()
    train(cfg, train_loader, device="cpu", resume_from=tmp_path / "last.pt", on_progress=seen.append)
    assert [p.step for p in seen] == list(range(4, 10)) and seen[-1].fraction == 1.0


def test_rng_state_round_trip() -> None:
    state = capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_atomic_save_replaces_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint({"epoch": 1, "weights": torch.ones(2)}, path)
    save_checkpoint({"epoch": 2, "weights": torch.zeros(2)}, path)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    state = load_checkpoint(path)
    assert state["epoch"] == 2 and torch.equal(state["weights"], torch.zeros(2))


def test_unsafe_or_foreign_checkpoints_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"

    class WritesAFile:
        def __reduce__(self):  # noqa: ANN204 - pickle protocol
            return (Path.write_text, (marker, "owned"))

    torch.save({"format_version": 1, "model": WritesAFile()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save({"weights": torch.ones(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a Tessera training checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "junk.pt").write_bytes(pickle.dumps("x")[:3])
    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")


def test_resume_does_not_need_the_pretrained_file_again(tmp_path: Path) -> None:
    weights = tmp_path / "pretrained.pt"
    torch.manual_seed(9)
    torch.save(build_baseline_model(CONFIGS["baseline"], load_pretrained=False).trunk.state_dict(), weights)
    cfg = BaselineConfig(**{**CONFIGS["baseline"].to_dict(), "pretrained_weights": str(weights)})
    _run(cfg, checkpoint_dir=tmp_path / "run", max_steps=3)
    weights.unlink()
    resumed, _ = _run(cfg, resume_from=tmp_path / "run" / "last.pt")
    assert resumed.status == "succeeded" and resumed.epochs_completed == 3


class MinuteClock:
    """A clock that moves one minute each time it is read: time-based checkpoints without waiting."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 60.0
        return self.now


@pytest.mark.parametrize("algorithm", sorted(CONFIGS))
def test_resume_from_a_mid_epoch_checkpoint_equals_uninterrupted(tmp_path: Path, algorithm: str) -> None:
    cfg = type(CONFIGS[algorithm])(**{**CONFIGS[algorithm].to_dict(), "checkpoint_every_minutes": 1.5})
    straight, straight_losses = _run(cfg)
    # One clock read per step and one per save, 90 s apart: mid-epoch checkpoints after steps 2, 5
    # and 8, epoch-end ones after 3 and 6. Stopped after step 8, whose checkpoint is the newest.
    first, first_losses = _run(cfg, checkpoint_dir=tmp_path, max_steps=8, clock=MinuteClock())
    assert first.status == "stopped" and first_losses == straight_losses[:8]
    state = load_checkpoint(tmp_path / "last.pt")
    assert (state["epoch"], state["batch"], state["step"]) == (2, 2, 8)
    assert load_checkpoint(tmp_path / "previous.pt")["step"] == 6
    # A fresh call skips the epoch's two finished batches and continues with the same order.
    resumed, resumed_losses = _run(cfg, resume_from=tmp_path / "last.pt")
    assert resumed.status == "succeeded" and resumed.steps == 9 and resumed_losses == straight_losses[8:]
    assert [m.train_loss for m in resumed.history] == [m.train_loss for m in straight.history]
    assert resumed.final == straight.final
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_checkpoint_interval_is_validated() -> None:
    for bad in (0, -1.0, "5", float("nan"), True):
        with pytest.raises(ConfigError, match="checkpoint_every_minutes"):
            BaselineConfig(num_classes=2, checkpoint_every_minutes=bad)
    assert BaselineConfig(num_classes=2, checkpoint_every_minutes=0.25).checkpoint_every_minutes == 0.25


def test_auto_resume_takes_the_newest_readable_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = CONFIGS["baseline"]
    # Nothing there yet: a fresh run (which writes last.pt after epoch 1 and 2, previous.pt = epoch 1).
    first, first_losses = _run(cfg, checkpoint_dir=tmp_path, max_steps=6, resume_from="auto")
    assert first.steps == 6 and len(first_losses) == 6
    assert load_checkpoint(tmp_path / "previous.pt")["step"] == 3
    straight, straight_losses = _run(cfg)
    # A crash that leaves last.pt cut short: auto skips it with a warning and takes previous.pt.
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(data[: len(data) // 2])
    with caplog.at_level("WARNING"):
        resumed, resumed_losses = _run(cfg, checkpoint_dir=tmp_path, resume_from="auto")
    assert "ignoring checkpoint" in caplog.text and "last.pt" in caplog.text
    assert resumed.steps == 9 and resumed_losses == straight_losses[3:]
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    with pytest.raises(ValueError, match="needs a checkpoint_dir"):
        _run(cfg, resume_from="auto")


def test_a_finished_run_is_extended_on_the_longer_schedule(tmp_path: Path) -> None:
    cfg = CONFIGS["baseline"]
    finished, finished_lrs = _run_lrs(cfg, checkpoint_dir=tmp_path / "finished")
    assert finished.status == "succeeded" and finished_lrs[-1] == 0
    longer = BaselineConfig(**{**cfg.to_dict(), "epochs": 5})
    extended, extended_lrs = _run_lrs(
        longer, checkpoint_dir=tmp_path / "extended", resume_from=tmp_path / "finished" / "last.pt"
    )
    assert extended.status == "succeeded" and extended.epochs_completed == 5 and extended.steps == 15
    assert [m.to_dict() for m in extended.history[:3]] == [m.to_dict() for m in finished.history]
    # From step 10 on, the rates are exactly those of a run planned with 5 epochs: the decay
    # restarts above zero and ends at zero again.
    _, planned_lrs = _run_lrs(longer, max_steps=15)
    assert extended_lrs == planned_lrs[9:] and extended_lrs[0] > 0 and extended_lrs[-1] == 0
    assert extended.final is not None and extended.final == extended.history[-1].val_report
    # The first step after the resume already trains at the new rate (the checkpoint's was 0).
    one_more, _ = _run_lrs(longer, resume_from=tmp_path / "finished" / "last.pt", max_steps=10)
    before, after = dict(finished.model.named_parameters()), dict(one_more.model.named_parameters())
    assert one_more.steps == 10
    assert not any(torch.equal(before[k], after[k]) for k in ("classifier.weight", "classifier.bias"))


def test_resume_refuses_fewer_epochs_and_lists_every_changed_field(tmp_path: Path) -> None:
    cfg = CONFIGS["patchgd"]
    _run(cfg, checkpoint_dir=tmp_path, max_steps=3)
    shorter = PatchGDConfig(**{**cfg.to_dict(), "epochs": 2})
    with pytest.raises(CheckpointError, match="epochs can only be extended on resume: .* 3, this one 2"):
        _run(shorter, resume_from=tmp_path / "last.pt")
    changed = PatchGDConfig(**{**cfg.to_dict(), "epochs": 4, "lr_head": 0.5, "batch_size": 4, "seed": 1})
    with pytest.raises(CheckpointError, match="different hyperparameters: batch_size, lr_head, seed$"):
        _run(changed, resume_from=tmp_path / "last.pt")


def _run_lrs(cfg, **kwargs):  # noqa: ANN001, ANN202 - test helper
    lrs: list[float] = []
    train_loader, val_loader = _loaders()
    record = lambda p: p.phase == "train" and lrs.append(p.lr)  # noqa: E731
    result = train(cfg, train_loader, val_loader, device="cpu", on_progress=record, **kwargs)
    return result, lrs


def test_mid_epoch_resume_with_a_plain_iterable_of_batches(tmp_path: Path) -> None:
    # Not a DataLoader: the finished batches are read again and dropped.
    cfg = BaselineConfig(**{**CONFIGS["baseline"].to_dict(), "epochs": 2, "checkpoint_every_minutes": 1.5})
    batches = list(_loaders()[0])

    def run(**kwargs):  # noqa: ANN003, ANN202 - test helper
        losses: list[float] = []
        result = train(cfg, batches, device="cpu", on_progress=lambda p: losses.append(p.loss), **kwargs)
        return result, losses

    straight, straight_losses = run()
    run(checkpoint_dir=tmp_path, max_steps=5, clock=MinuteClock())
    assert load_checkpoint(tmp_path / "last.pt")["batch"] == 2  # after step 5: epoch 1, batch 2
    resumed, resumed_losses = run(resume_from=tmp_path / "last.pt")
    assert resumed_losses == straight_losses[5:]
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
