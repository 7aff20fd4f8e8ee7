"""Patch coverage: how often each grid cell was sampled for a gradient pass, counted by the engine."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from worker.patchgd.config import PatchGDConfig
from worker.patchgd.train import Progress, _inner_chunks, _patch_order, train

#: 12 images in batches of 5, 5 and 2.
BATCH_SIZES = (5, 5, 2)


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(7)
    images = torch.randn(12, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 3, (12,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=5, shuffle=True, generator=torch.Generator())


def _config(**overrides) -> PatchGDConfig:  # noqa: ANN003
    values = dict(
        num_classes=3,
        backbone="mobilenet_v3_small",
        image_size=32,
        patch_size=8,  # a 4×4 grid
        sampling=0.25,  # k = 4
        latent_dim=8,
        head_width=8,
        epochs=2,
        batch_size=5,
        warmup_epochs=0,
        seed=11,
    )
    values.update(overrides)
    return PatchGDConfig(**values)


def _run(cfg: PatchGDConfig, **kwargs):  # noqa: ANN003, ANN202
    seen: list[Progress] = []
    result = train(cfg, _loader(), None, device="cpu", on_progress=seen.append, **kwargs)
    return result, seen


def _expected(cfg: PatchGDConfig, epochs: int) -> list[int]:
    """The engine's own draws replayed: per step the fill order, then the inner chunks, all from
    a generator seeded like the engine's patch sampler."""
    sampler = torch.Generator().manual_seed(cfg.seed)
    counts = torch.zeros(cfg.grid.num_patches, dtype=torch.int64)
    for _ in range(epochs):
        for batch in BATCH_SIZES:
            _patch_order(cfg.grid.num_patches, batch, cfg.per_image_positions, sampler)
            for chunk in _inner_chunks(
                cfg.grid.num_patches, cfg.k, cfg.num_inner_iterations, batch, cfg.per_image_positions, sampler
            ):
                if chunk.dim() == 1:
                    counts[chunk] += batch
                else:
                    counts += torch.bincount(chunk.reshape(-1), minlength=cfg.grid.num_patches)
    return counts.tolist()


def test_full_sweeps_cover_every_cell_once_per_image() -> None:
    # Default inner iterations: one full sweep of the grid per image per step, so after 2 epochs
    # of 12 images every one of the 16 cells was sampled 24 times.
    cfg = _config(per_image_positions=True)
    result, seen = _run(cfg)
    assert result.patch_coverage == [24] * 16
    assert sum(result.patch_coverage) == 2 * 12 * cfg.k * cfg.num_inner_iterations
    # Progress carries the running counts: after each step they sum to the patches sampled so far.
    images = 0
    for progress, batch in zip(seen, BATCH_SIZES * 2, strict=True):
        images += batch
        assert sum(progress.patch_coverage) == images * cfg.k * cfg.num_inner_iterations


def test_partial_sweeps_match_the_engines_sampling() -> None:
    # 3 of 4 chunks per step, one shared order for the batch: uneven coverage, exactly as drawn.
    cfg = _config(inner_iterations=3)
    result, _ = _run(cfg)
    expected = _expected(cfg, cfg.epochs)
    assert result.patch_coverage == expected
    assert sum(expected) == 2 * 12 * cfg.k * 3
    assert len(set(expected)) > 1  # the precondition: this run really covers the grid unevenly


def test_per_image_partial_sweeps_match_the_engines_sampling() -> None:
    cfg = _config(inner_iterations=3, per_image_positions=True)
    result, _ = _run(cfg)
    assert result.patch_coverage == _expected(cfg, cfg.epochs)


def test_resume_keeps_the_counts_exact(tmp_path: Path) -> None:
    cfg = _config(inner_iterations=3, epochs=3)
    straight, _ = _run(cfg)
    events: list[tuple[str, dict]] = []
    # Stopped mid-epoch (step 4 of 9) with a checkpoint after every step, then resumed.
    ticks = iter(range(10**6))
    first, _ = _run(
        _config(inner_iterations=3, epochs=3, checkpoint_every_minutes=1e-9),
        checkpoint_dir=tmp_path,
        max_steps=4,
        clock=lambda: float(next(ticks)),
    )
    assert first.status == "stopped"
    resumed, _ = _run(
        cfg,
        checkpoint_dir=tmp_path,
        resume_from="auto",
        on_event=lambda kind, info: events.append((kind, info)),
    )
    assert resumed.status == "succeeded"
    assert resumed.patch_coverage == straight.patch_coverage
    kind, info = events[0]
    assert (kind, info["epoch"], info["batch"], info["step"]) == ("resumed", 1, 1, 4)
    # The resumed run checkpoints only at its two epoch ends.
    assert [(kind, info["epoch"], info["reason"]) for kind, info in events[1:]] == [
        ("checkpoint", 2, "epoch"),
        ("checkpoint", 3, "epoch"),
    ]


def test_baseline_has_no_coverage() -> None:
    from worker.patchgd.config import BaselineConfig

    cfg = BaselineConfig(num_classes=3, backbone="resnet18", image_size=32, epochs=1, batch_size=5, seed=3)
    seen: list[Progress] = []
    result = train(cfg, _loader(), None, device="cpu", on_progress=seen.append)
    assert result.patch_coverage is None
    assert all(p.patch_coverage is None for p in seen)
