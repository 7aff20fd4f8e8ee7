"""The training loop: learning, progress callbacks, cancellation, step limits, input checks."""

from __future__ import annotations

import math

import psutil
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from worker.patchgd.config import BaselineConfig, PatchGDConfig
from worker.patchgd.grid import TensorPatchSource
from worker.patchgd.train import EpochMetrics, Progress, train


def _bright_square_dataset(count: int = 16, size: int = 64, seed: int = 0) -> TensorDataset:
    """Class 1 images hide one bright 12 px square somewhere in noise; class 0 are plain noise."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 3, size, size, generator=generator) * 0.5
    labels = torch.arange(count) % 2
    for i in range(count):
        if labels[i] == 1:
            row, col = torch.randint(0, size - 12, (2,), generator=generator).tolist()
            images[i, :, row : row + 12, col : col + 12] += 3.0
    return TensorDataset(images, labels)


def _loaders(batch_size: int = 4) -> tuple[DataLoader, DataLoader]:
    train_set, val_set = _bright_square_dataset(16, seed=0), _bright_square_dataset(8, seed=1)
    return (
        DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=torch.Generator()),
        DataLoader(val_set, batch_size=4),
    )


def _patchgd_cfg(**changes) -> PatchGDConfig:
    params = {
        "num_classes": 2,
        "backbone": "resnet18",
        "image_size": 64,
        "patch_size": 16,
        "sampling": 0.25,
        "latent_dim": 16,
        "head": "linear",
        "head_dropout": 0.0,
        "epochs": 4,
        "batch_size": 4,
        "warmup_epochs": 1,
        "lr_backbone": 3e-3,
        "lr_head": 3e-3,
        **changes,
    }
    return PatchGDConfig(**params)


def _learned(epochs: list[EpochMetrics]) -> bool:
    """Training loss halved, and the bright square is found on unseen images: validation loss
    under half of chance level (ln 2 for two classes), at most 2 of 8 wrong."""
    first, last = epochs[0], epochs[-1]
    return (
        last.train_loss < first.train_loss / 2
        and last.val_loss < math.log(2) / 2
        and last.val_accuracy >= 0.75
    )


def test_patchgd_learns_and_reports_progress() -> None:
    cfg = _patchgd_cfg()
    train_loader, val_loader = _loaders()
    progress: list[Progress] = []
    epochs: list[EpochMetrics] = []
    result = train(
        cfg, train_loader, val_loader, device="cpu", on_progress=progress.append, on_epoch_end=epochs.append
    )
    progress = [p for p in progress if p.phase == "train"]  # evaluation heartbeats aside
    assert result.status == "succeeded"
    assert result.epochs_completed == 4 and result.steps == 16
    assert [p.step for p in progress] == list(range(1, 17))
    assert all(p.total_steps == 16 for p in progress)
    assert progress[-1].fraction == 1.0 and progress[-1].eta_seconds == 0
    # The ETA is the remaining steps at the measured rate (4 images a step), whatever the timings.
    for p in progress:
        assert math.isclose(p.eta_seconds, (16 - p.step) * 4 / p.images_per_s, rel_tol=1e-9), p
    assert all(p.images_per_s > 0 and p.patches_per_s > 8 * p.images_per_s for p in progress)
    assert all(p.peak_memory_bytes > 10 * 2**20 for p in progress)
    # Warmup over the first epoch (4 steps), then linear decay to zero.
    assert progress[0].lr < progress[3].lr == max(p.lr for p in progress)
    assert progress[-1].lr == 0
    assert [e.epoch for e in epochs] == [0, 1, 2, 3] and result.history == epochs
    assert all(e.val_loss is not None and 0 <= e.val_accuracy <= 1 for e in epochs)
    # The reported result is the final model on the held-out loader, not the best epoch.
    assert result.final == epochs[-1].val_report
    assert result.final["num_samples"] == 8 and len(result.final["confusion_matrix"]) == 2

    # It learns. Sixteen steps of a tiny model follow a path that floating-point details of the
    # CPU can change, so a run that falls short is retried with other seeds (independent paths)
    # rather than passing or failing by one CPU's rounding; a broken update fails all of them.
    # (This machine, seeds 0/1/2: train loss 0.97/0.81/0.72 -> 0.11/0.18/0.23, final val loss
    # 0.04/0.02/0.03 against 0.35, val accuracy 1.0: each seed alone passes by a wide margin.)
    attempts = [epochs]
    for seed in (1, 2):
        if _learned(attempts[-1]):
            break
        retry: list[EpochMetrics] = []
        train(_patchgd_cfg(seed=seed), *_loaders(), device="cpu", on_epoch_end=retry.append)
        attempts.append(retry)
    summary = [
        (e[0].train_loss, e[-1].train_loss, e[0].val_loss, e[-1].val_loss, e[-1].val_accuracy)
        for e in attempts
    ]
    assert _learned(attempts[-1]), (
        f"did not learn with seeds 0-2 (train/val loss first, last; accuracy): {summary}"
    )


def test_should_stop_cancels_between_steps() -> None:
    calls = []

    def stop_on_third_check() -> bool:
        calls.append(1)
        return len(calls) >= 3

    train_loader, _ = _loaders()
    result = train(_patchgd_cfg(), train_loader, device="cpu", should_stop=stop_on_third_check)
    assert result.status == "cancelled"
    assert result.steps == 2 and result.epochs_completed == 0 and result.final is None


def test_max_steps_stops_and_baseline_trains(tmp_path) -> None:
    train_loader, val_loader = _loaders()
    cfg = BaselineConfig(
        num_classes=2, backbone="resnet18", image_size=64, epochs=2, batch_size=4, gradient_checkpointing=True
    )
    result = train(cfg, train_loader, val_loader, device="cpu", max_steps=6, checkpoint_dir=tmp_path)
    assert result.status == "stopped" and result.steps == 6
    assert result.epochs_completed == 1 and result.final is None
    assert result.checkpoint_path == tmp_path / "last.pt" and result.checkpoint_path.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary files left behind


def test_loader_may_yield_patch_sources() -> None:
    cfg = _patchgd_cfg(epochs=1)
    data = _bright_square_dataset(4)
    batches = [
        (TensorPatchSource(data.tensors[0][i : i + 2], cfg.grid), data.tensors[1][i : i + 2]) for i in (0, 2)
    ]
    result = train(cfg, batches, device="cpu")
    assert result.status == "succeeded" and result.steps == 2


def test_images_of_the_wrong_size_are_explained() -> None:
    loader = [(torch.zeros(2, 3, 48, 48), torch.tensor([0, 1]))]
    with pytest.raises(ValueError, match=r"expected images of shape \[B, C, 64, 64\], got \(2, 3, 48, 48\)"):
        train(_patchgd_cfg(epochs=1), loader, device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_channels_last_training() -> None:
    train_loader, val_loader = _loaders()
    progress: list[Progress] = []
    for cfg in (
        _patchgd_cfg(epochs=1),
        BaselineConfig(num_classes=2, backbone="resnet18", image_size=64, epochs=1),
    ):
        assert cfg.use_bf16("cuda") and cfg.use_channels_last("cuda")
        result = train(cfg, train_loader, val_loader, device="cuda", on_progress=progress.append)
        assert result.status == "succeeded" and next(result.model.parameters()).is_cuda
        assert all(torch.isfinite(torch.tensor(h.train_loss)) for h in result.history)
    assert all(0 < p.peak_memory_bytes < torch.cuda.get_device_properties(0).total_memory for p in progress)


def test_every_parameter_group_reports_its_learning_rate() -> None:
    cfg = _patchgd_cfg(epochs=1, batch_size=8, lr_backbone=1e-3, lr_head=4e-3)
    train_loader, _ = _loaders(batch_size=8)
    progress: list[Progress] = []
    epochs: list[EpochMetrics] = []
    train(cfg, train_loader, device="cpu", on_progress=progress.append, on_epoch_end=epochs.append)
    assert len(progress) == 2
    for p in progress + epochs:
        assert set(p.lrs) == {"backbone", "head"} and p.lr == p.lrs["backbone"]
    # Reported after the scheduler stepped: the rates of step 2 of 2 of warmup, each group's own.
    assert progress[0].lrs == pytest.approx({"backbone": 1e-3, "head": 4e-3})
    baseline = BaselineConfig(num_classes=2, backbone="resnet18", image_size=64, epochs=1, batch_size=8)
    seen: list[Progress] = []
    train(baseline, train_loader, device="cpu", max_steps=1, on_progress=seen.append)
    assert set(seen[0].lrs) == {"model"} and seen[0].lr == seen[0].lrs["model"]


def test_evaluation_heartbeats_and_can_be_cancelled() -> None:
    cfg = _patchgd_cfg(epochs=1, batch_size=8)
    train_set, val_set = _bright_square_dataset(8, seed=0), _bright_square_dataset(8, seed=1)
    train_loader = DataLoader(train_set, batch_size=8)
    val_loader = DataLoader(val_set, batch_size=2)  # 4 evaluation batches
    seen: list[Progress] = []
    result = train(cfg, train_loader, val_loader, device="cpu", on_progress=seen.append)
    assert [(p.phase, p.phase_done, p.phase_total) for p in seen] == [("train", 1, 1)] + [
        ("eval", i, 4) for i in range(1, 5)
    ]
    evals = [p for p in seen if p.phase == "eval"]
    assert all(p.step == 1 and p.images_per_s > 0 and p.patches_per_s == 16 * p.images_per_s for p in evals)
    # The last heartbeat's running loss is the epoch's validation loss.
    assert evals[-1].loss == pytest.approx(result.history[0].val_loss)
    # should_stop is asked before each evaluation batch too: stop after two of the four.
    seen.clear()

    def stop_after_two_eval_batches() -> bool:
        return sum(p.phase == "eval" for p in seen) == 2

    cancelled = train(
        cfg,
        train_loader,
        val_loader,
        device="cpu",
        on_progress=seen.append,
        should_stop=stop_after_two_eval_batches,
    )
    assert cancelled.status == "cancelled" and cancelled.epochs_completed == 0 and cancelled.history == []
    assert [p.phase for p in seen] == ["train", "eval", "eval"] and cancelled.final is None


BIG = 300 * 2**20  # far above any noise in the resident set of a test process


class AllocatingLoader:
    """One batch, handed out after allocating (and touching) a 300 MiB buffer and freeing it again."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels
        self.rss_before = 0

    def __len__(self) -> int:
        return 1

    def __iter__(self):  # noqa: ANN204 - iterator protocol
        self.rss_before = psutil.Process().memory_info().rss
        buffer = torch.ones(BIG // 4)  # written, so every page is resident at once
        del buffer  # a block this large is unmapped on free: the resident set drops again
        yield self.images, self.labels


def test_cpu_peak_memory_is_a_high_water_mark_not_the_current_rss() -> None:
    data = _bright_square_dataset(4)
    cfg = BaselineConfig(num_classes=2, backbone="mobilenet_v3_small", image_size=64, epochs=1, batch_size=4)
    seen: list[tuple[int, int]] = []

    def record(progress: Progress) -> None:
        seen.append((progress.peak_memory_bytes, psutil.Process().memory_info().rss))

    loader = AllocatingLoader(*data.tensors)
    epochs: list[EpochMetrics] = []
    train(cfg, loader, device="cpu", on_progress=record, on_epoch_end=epochs.append)
    ((peak, rss_now),) = seen
    # The resident set held the whole buffer at one moment during the epoch (less whatever else
    # the process gave back meanwhile: a generous 10%)...
    assert peak >= loader.rss_before + 0.9 * BIG, (peak / 2**20, loader.rss_before / 2**20)
    # ...and the small model's step (a few tens of MiB) grows it far less than the buffer took,
    # so afterwards the peak stays well above the current RSS, which the old report returned.
    assert peak - rss_now > BIG / 2, (peak / 2**20, rss_now / 2**20)
    assert epochs[0].peak_memory_bytes >= peak
