"""Peak-memory measurement, the analytic model and the budget planner."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from worker.patchgd.config import BaselineConfig, PatchGDConfig
from worker.patchgd.memory import (
    GIB,
    Calibration,
    RssSampler,
    SyntheticPatchSource,
    calibrate_backbone,
    calibration_counts,
    calibration_from_peaks,
    calibration_patch_size,
    estimate_baseline_bytes,
    estimate_patchgd_bytes,
    measure_peak,
    patchgd_trial,
    plan,
    plan_baseline,
    plan_patchgd,
    step_calibration_points,
)
from worker.patchgd.testing import allocate_and_touch

MIB = 1 << 20


def test_known_allocation_is_measured_in_a_child() -> None:
    # By name, as the child process imports it.
    result = measure_peak("worker.patchgd.testing:allocate_and_touch", 200 * MIB)
    assert result.fits and result.status == "ok" and result.result == 200 * MIB
    assert 195 * MIB <= result.peak_bytes <= 230 * MIB, result.peak_bytes / MIB
    assert result.baseline_bytes > 50 * MIB  # the child's interpreter + torch, not counted in the peak


def test_in_process_measurement_and_sampler() -> None:
    result = measure_peak(allocate_and_touch, 120 * MIB, isolate=False)
    assert result.fits and 110 * MIB <= result.peak_bytes <= 200 * MIB
    with RssSampler() as sampler:
        allocate_and_touch(64 * MIB)
    assert sampler.growth >= 60 * MIB


def test_failed_allocation_is_a_result_not_a_crash() -> None:
    result = measure_peak(allocate_and_touch, 1 << 50)  # a petabyte: the allocation itself fails
    assert not result.fits and result.status == "out_of_memory"
    assert "MemoryError" in result.reason


def test_limit_stops_a_growing_workload() -> None:
    result = measure_peak(allocate_and_touch, 3 * GIB, 2.0, limit_bytes=300 * MIB)
    assert result.status == "out_of_memory" and not result.fits
    assert "over the limit" in result.reason


def test_killed_and_failing_workloads_are_reported() -> None:
    killed = measure_peak("signal:raise_signal", 9)
    assert killed.status == "out_of_memory" and "SIGKILL" in killed.reason
    failed = measure_peak("os:listdir", "/no/such/folder")
    assert failed.status == "error" and "FileNotFoundError" in failed.reason
    unknown = measure_peak("worker.patchgd.memory:no_such_function")
    assert unknown.status == "error" and "cannot load workload" in unknown.reason


def test_workloads_that_cannot_run_in_a_child_are_refused() -> None:
    with pytest.raises(ValueError, match="module-level function"):
        measure_peak(lambda: 1)
    with pytest.raises(ValueError, match="JSON values"):
        measure_peak(allocate_and_touch, object())


def test_timeout_kills_the_child() -> None:
    result = measure_peak("time:sleep", 600, timeout_s=20)
    assert result.status == "timeout" and not result.fits and result.wall_s < 120


def _small_cfg(**overrides) -> PatchGDConfig:
    base = dict(
        num_classes=3,
        backbone="mobilenet_v3_small",
        image_size=512,
        patch_size=128,
        patches_per_step=16,
        batch_size=2,
        precision="fp32",
        channels_last=False,
    )
    return PatchGDConfig(**{**base, **overrides})


def test_estimate_terms_scale_as_the_model_says() -> None:
    cfg = _small_cfg()
    small_k = estimate_patchgd_bytes(cfg, bytes_per_pixel=500.0, patches_per_step=4)
    big_k = estimate_patchgd_bytes(cfg, bytes_per_pixel=500.0, patches_per_step=16)
    assert big_k.terms["activations"] == 4 * small_k.terms["activations"] == int(16 * 2 * 500 * 128 * 128)
    assert big_k.terms["params_grads_optimizer"] == small_k.terms["params_grads_optimizer"] > 0
    streamed = estimate_patchgd_bytes(cfg, bytes_per_pixel=500.0, streaming=True, patches_per_step=4)
    assert streamed.terms["image_buffer"] < big_k.terms["image_buffer"] == 2 * 3 * 512 * 512 * 4
    # PatchGD activations depend on k*P^2, not on S^2; the baseline's grow with S^2.
    large = estimate_patchgd_bytes(dataclasses.replace(cfg, image_size=4096), bytes_per_pixel=500.0)
    assert large.terms["activations"] == big_k.terms["activations"]
    base = BaselineConfig(num_classes=3, backbone="mobilenet_v3_small", image_size=512, batch_size=1)
    b512 = estimate_baseline_bytes(base, bytes_per_pixel=500.0)
    b1024 = estimate_baseline_bytes(base, bytes_per_pixel=500.0, image_size=1024)
    assert b1024.terms["activations"] == 4 * b512.terms["activations"]


def test_calibration_counts_hold_the_same_pixels_at_every_patch_size() -> None:
    # Two runs of (2, 6) patches of 256 px, in pixels: the difference c is read from does not
    # shrink with the patch, so neither does its size beside the allocator's noise.
    for patch in (32, 64, 128, 256):
        small, large = calibration_counts(patch)
        assert large == 3 * small and small * patch * patch == 2 * 256 * 256, patch
    assert calibration_counts(128) == (8, 24)
    assert calibration_counts(512) == (1, 3) and calibration_counts(1024) == (1, 3)  # at least one patch
    with pytest.raises(ValueError, match="positive"):
        calibration_counts(0)


def test_estimate_counts_the_head_optimizer_temporary_only() -> None:
    # The backbone's optimizer temporaries are in the measured overhead (calibration runs hold
    # AdamW state made by a real step); only the head, never calibrated, gets the 4 B/param.
    cfg = _small_cfg()
    from worker.patchgd import memory

    backbone_params, head_params = memory._patchgd_param_counts(cfg)
    terms = estimate_patchgd_bytes(cfg, bytes_per_pixel=500.0, overhead_bytes=7).terms
    assert terms["optimizer_workspace"] == 4 * head_params
    assert terms["params_grads_optimizer"] == 16 * (backbone_params + head_params)
    assert terms["runtime_overhead"] == 7
    base = BaselineConfig(num_classes=3, backbone="mobilenet_v3_small", image_size=512, batch_size=1)
    assert "optimizer_workspace" not in estimate_baseline_bytes(base, bytes_per_pixel=500.0).terms


def test_step_calibration_points() -> None:
    for patch, image in ((128, 8192), (256, 2048), (512, 16384)):
        cfg = _small_cfg(image_size=image, patch_size=patch, patches_per_step=16, batch_size=4)
        first, second = step_calibration_points(cfg)
        assert (first.k, second.k) == calibration_counts(patch)
        for point in (first, second):
            assert point.batch_size == 1 and point.patch_size == patch
            # Both measured inner iterations encode k patches: the grid holds two of the larger k.
            assert point.grid.num_patches >= 2 * second.k and point.grid.n >= 3
            assert point.is_exact  # a full sweep: the defaults the planner's trials use
    for size, expected in ((2048, (288, 512)), (928, (288, 512)), (200, (96, 192)), (32, (64, 128))):
        base = BaselineConfig(num_classes=3, backbone="resnet18", image_size=size, batch_size=2)
        points = step_calibration_points(base)
        assert tuple(p.image_size for p in points) == expected
        assert all(p.batch_size == 1 and p.image_size % 32 == 0 for p in points)


@pytest.mark.parametrize("overhead", [48 * MIB, -20 * MIB])
def test_calibration_from_peaks_inverts_the_model(overhead) -> None:
    # Peaks made by the model itself from known c and overhead give them back: the calibration
    # subtracts exactly the terms the estimate adds (a negative overhead is kept, see its doc).
    cfg = _small_cfg(image_size=4096, patch_size=256, patches_per_step=8, batch_size=2)
    first, second = step_calibration_points(cfg)
    peaks = tuple(
        estimate_patchgd_bytes(p, bytes_per_pixel=700.0, streaming=True, overhead_bytes=overhead).total_bytes
        for p in (first, second)
    )
    found = calibration_from_peaks(cfg, peaks)
    assert found.bytes_per_pixel == pytest.approx(700.0, rel=1e-6)
    assert abs(found.overhead_bytes - overhead) <= 2
    base = BaselineConfig(num_classes=3, backbone="mobilenet_v3_small", image_size=1024, batch_size=1)
    low, top = step_calibration_points(base)
    peaks = tuple(
        estimate_baseline_bytes(p, bytes_per_pixel=900.0, overhead_bytes=overhead).total_bytes
        for p in (low, top)
    )
    found = calibration_from_peaks(base, peaks)
    assert found.bytes_per_pixel == pytest.approx(900.0, rel=1e-6)
    assert abs(found.overhead_bytes - overhead) <= 2


def test_cached_calibration_of_the_current_method_is_used_without_measuring(tmp_path, monkeypatch) -> None:
    from worker.patchgd import memory

    monkeypatch.setattr(memory, "_CALIBRATION", {})
    cache = tmp_path / "calibration.json"
    # No backbone has this name: measuring it would fail, so an answer proves the cache was read.
    key = "no_such_backbone|cpu|fp32|cf|96"
    entry = {"bytes_per_pixel": 1234.5, "overhead_bytes": 42, "method": memory._CALIBRATION_METHOD}
    cache.write_text(json.dumps({key: entry}))
    assert calibrate_backbone("no_such_backbone", patch_size=96, cache_file=cache) == Calibration(1234.5, 42)
    # The same entry from an earlier method is not trusted: it is measured again (and fails here).
    monkeypatch.setattr(memory, "_CALIBRATION", {})
    cache.write_text(json.dumps({key: {"bytes_per_pixel": 1234.5, "overhead_bytes": 42}}))
    with pytest.raises(RuntimeError, match="calibration of no_such_backbone failed"):
        calibrate_backbone("no_such_backbone", patch_size=96, cache_file=cache)


def test_planner_choice_is_measured_under_the_budget(tmp_path, monkeypatch) -> None:
    from worker.patchgd import memory

    monkeypatch.setattr(memory, "_CALIBRATION", {})
    cfg = _small_cfg()
    cache = tmp_path / "calibration.json"
    # An entry of an earlier calibration method (no "method") is measured again, not used.
    cache.write_text(
        json.dumps({"mobilenet_v3_small|cpu|fp32|cf|128": {"bytes_per_pixel": 1e9, "overhead_bytes": 0}})
    )
    calibration = calibrate_backbone("mobilenet_v3_small", cache_file=cache)
    assert 100 < calibration.bytes_per_pixel < 5000
    assert 0 <= calibration.overhead_bytes < 500 * MIB
    stored = json.loads(cache.read_text())["mobilenet_v3_small|cpu|fp32|cf|128"]
    assert stored["method"] == memory._CALIBRATION_METHOD and stored["counts"] == [8, 24]
    budget_gib = 0.25
    wanted = estimate_patchgd_bytes(
        cfg, bytes_per_pixel=calibration.bytes_per_pixel, overhead_bytes=calibration.overhead_bytes
    )
    assert wanted.total_bytes > budget_gib * GIB  # the requested k=16, batch 2 does not fit
    plan = plan_patchgd(cfg, budget_gib, calibration=calibration)
    assert plan.fits, plan.reason
    assert plan.batch_size == 2 and plan.patches_per_step < 16  # k shrinks before the batch does
    assert plan.predicted_bytes <= 0.85 * budget_gib * GIB
    assert plan.measured_bytes is not None and plan.measured_bytes <= budget_gib * GIB
    assert len(plan.trials) >= 1 and plan.trials[-1]["fits"]
    planned = PatchGDConfig.from_dict(plan.config)
    assert planned.k == plan.patches_per_step and planned.is_exact
    # An independent measurement of the chosen settings agrees: under the budget.
    again = measure_peak(patchgd_trial, plan.config, "cpu", 1)
    assert again.fits and again.peak_bytes <= budget_gib * GIB


def test_impossible_budget_does_not_fit() -> None:
    plan = plan_patchgd(_small_cfg(), 0.01, calibration=Calibration(500.0, 0))
    assert not plan.fits and plan.reason.startswith("does not fit")
    assert "parameters, gradients and optimizer state" in plan.reason and plan.trials == []
    base = BaselineConfig(num_classes=3, backbone="resnet50", image_size=512, batch_size=2)
    plan_b = plan_baseline(base, 0.2, calibration=Calibration(1900.0, 0))
    assert not plan_b.fits and "does not fit" in plan_b.reason
    with pytest.raises(ValueError, match="positive number of GiB"):
        plan_patchgd(_small_cfg(), -1)


def test_baseline_planner_shrinks_batch_then_resolution() -> None:
    base = BaselineConfig(num_classes=3, backbone="mobilenet_v3_small", image_size=512, batch_size=4)
    batch_only = plan_baseline(base, 0.2, calibration=Calibration(548.0, 0), verify=False)
    assert batch_only.fits and batch_only.image_size == 512 and 1 <= batch_only.batch_size < 4
    resized = plan_baseline(base, 0.1, calibration=Calibration(548.0, 0), verify=False)
    assert resized.fits and resized.batch_size == 1
    assert resized.image_size < 512 and resized.image_size % 32 == 0
    assert resized.predicted_bytes <= 0.85 * 0.1 * GIB
    bigger = estimate_baseline_bytes(
        base, bytes_per_pixel=548.0, batch_size=1, image_size=resized.image_size + 32
    )
    assert bigger.total_bytes > 0.85 * 0.1 * GIB  # the largest resolution that fits was chosen


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_measurement_and_budget() -> None:
    from worker.patchgd.memory import enforce_budget

    result = measure_peak(lambda: torch.ones(64 * MIB, device="cuda").sum().item(), device="cuda")
    assert result.fits and 256 * MIB <= result.peak_bytes <= 300 * MIB
    fraction = enforce_budget(1.0)
    try:
        failed = measure_peak(lambda: torch.empty(2 * GIB, dtype=torch.uint8, device="cuda"), device="cuda")
        assert failed.status == "out_of_memory"
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert 0 < fraction <= 1


def test_synthetic_source_makes_only_the_requested_patches() -> None:
    cfg = _small_cfg(image_size=65536, patch_size=128)
    source = SyntheticPatchSource(2, 3, cfg.grid)
    patches = source.patches(torch.tensor([[0, 5, 9], [1, 2, 3]]))
    assert patches.shape == (2, 3, 3, 128, 128) and patches.dtype == torch.float32


def test_streamed_plan_never_holds_the_image(tmp_path) -> None:
    # 16384^2 RGB float32 is 3 GiB: far over the budget, so only a streamed plan can fit.
    size = 16384
    image_bytes = size * size * 3 * 4
    cfg = _small_cfg(image_size=size, patch_size=512, patches_per_step=8, batch_size=1)
    cache = tmp_path / "calibration.json"
    in_memory = plan(cfg, 0.6, cache_file=cache, verify=False)
    assert not in_memory.fits  # the in-memory image alone is over the budget
    streamed = plan(cfg, 0.6, cache_file=cache, streamed=True)
    assert streamed.fits, streamed.reason
    assert streamed.measured_bytes is not None and streamed.measured_bytes < image_bytes / 5
    assert streamed.trials[-1]["status"] == "ok"
    # The backbone was calibrated at the configured patch size, not at a fixed one.
    assert calibration_patch_size(cfg) == 512
    assert [key.split("|")[-1] for key in json.loads(cache.read_text())] == ["512"]


def test_plan_dispatches_by_config_type() -> None:
    base = BaselineConfig(num_classes=3, backbone="mobilenet_v3_small", image_size=512, batch_size=2)
    chosen = plan(base, 0.2, calibration=Calibration(548.0, 0), verify=False)
    assert chosen.algorithm == "baseline" and chosen.fits
    assert plan(_small_cfg(), 1.0, calibration=Calibration(500.0, 0), verify=False).algorithm == "patchgd"
    with pytest.raises(ValueError, match="cannot be planned streamed"):
        plan(base, 1.0, calibration=Calibration(548.0, 0), streamed=True)
