"""PatchGD gradients against plain full-image autograd, and the traps of reimplementations.

A full sweep with accumulation over the whole sweep must give exactly the gradient of the
patch-decomposed model run on the full image (float64, eval-mode BatchNorm and dropout so every
pass sees the same function). ``GradientRecorder`` is a real optimizer whose step adds up the
gradients it is given instead of changing the weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from worker.patchgd.config import BaselineConfig, PatchGDConfig
from worker.patchgd.grid import TensorPatchSource
from worker.patchgd.models import build_baseline_model, build_patchgd_model
from worker.patchgd.train import baseline_step, build_optimizer, build_scheduler, lr_factor, patchgd_step


class GradientRecorder(torch.optim.Optimizer):
    """Sums the gradients present at every ``step()``; the parameters never move."""

    def __init__(self, params) -> None:  # noqa: ANN001 - same signature as torch optimizers
        super().__init__(params, {})
        self.total: dict[torch.nn.Parameter, torch.Tensor] = {}
        self.steps = 0

    @torch.no_grad()
    def step(self, closure=None) -> None:  # noqa: ANN001 - torch.optim.Optimizer API
        self.steps += 1
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.total[p] = self.total.get(p, torch.zeros_like(p)) + p.grad


def _tiny_cfg(**changes) -> PatchGDConfig:
    params = {
        "num_classes": 3,
        "backbone": "resnet18",
        "image_size": 64,
        "patch_size": 16,
        "sampling": 0.25,
        "latent_dim": 8,
        "head_width": 8,
        "precision": "fp32",
        **changes,
    }
    return PatchGDConfig(**params)


def _full_image_gradients(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    reference = copy.deepcopy(model)
    F.cross_entropy(reference(images), labels).backward()
    return {name: p.grad.clone() for name, p in reference.named_parameters()}


def _float64_problem(cfg: PatchGDConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = build_patchgd_model(cfg).double().eval()
    images = torch.randn(2, 3, cfg.image_size, cfg.image_size, dtype=torch.float64)
    return model, images, torch.tensor([0, 2])


@pytest.mark.parametrize(
    "changes",
    [
        {"head": "reference"},  # k = 4 of 16 patches, 4 inner iterations, one accumulation window
        {"sampling": None, "patches_per_step": 3},  # last chunk holds 1 patch
        {"per_image_positions": True},
        {"head": "linear"},
        {"head": "pooled"},
    ],
    ids=["reference-head", "uneven-chunks", "per-image-positions", "linear-head", "pooled-head"],
)
def test_full_sweep_accumulation_equals_full_image_gradient(changes: dict) -> None:
    cfg = _tiny_cfg(**changes)
    assert cfg.is_exact
    model, images, labels = _float64_problem(cfg)
    expected = _full_image_gradients(model, images, labels)
    recorder = GradientRecorder(model.parameters())
    stats = patchgd_step(model, recorder, TensorPatchSource(images, model.grid), labels, cfg)
    assert recorder.steps == stats.optimizer_steps == 1
    names = dict(model.named_parameters())
    for name, grad in expected.items():
        got = recorder.total[names[name]]
        assert torch.allclose(got, grad, rtol=1e-9, atol=1e-12), name
    # Not vacuous: the backbone really receives gradient (a detached write would give zeros).
    assert recorder.total[names["backbone.trunk.conv1.weight"]].abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_full_sweep_gradient_is_exact_on_cuda() -> None:
    """The same exactness on the GPU: patches, latent map and accumulation all on CUDA (float64)."""
    cfg = _tiny_cfg(head="pooled")
    model, images, labels = _float64_problem(cfg)
    model, images, labels = model.cuda(), images.cuda(), labels.cuda()
    expected = _full_image_gradients(model, images, labels)
    recorder = GradientRecorder(model.parameters())
    patchgd_step(model, recorder, TensorPatchSource(images, model.grid), labels, cfg)
    names = dict(model.named_parameters())
    for name, grad in expected.items():
        got = recorder.total[names[name]]
        assert got.is_cuda
        assert torch.allclose(got, grad, rtol=1e-9, atol=1e-12), name
    assert recorder.total[names["backbone.trunk.conv1.weight"]].abs().sum() > 0


def test_stale_regime_is_the_reference_one_and_differs_from_exact() -> None:
    cfg = _tiny_cfg(accumulation_steps=1)
    model, images, labels = _float64_problem(cfg)
    expected = _full_image_gradients(model, images, labels)
    recorder = GradientRecorder(model.parameters())
    stats = patchgd_step(model, recorder, TensorPatchSource(images, model.grid), labels, cfg)
    assert stats.optimizer_steps == recorder.steps == 4
    names = dict(model.named_parameters())
    # Without accumulation every inner step is a full-strength update: with frozen weights the head
    # collects 4 whole gradients, while each patch reaches the backbone once.
    head_weight = "head.classifier.weight"
    assert torch.allclose(recorder.total[names[head_weight]], 4 * expected[head_weight], rtol=1e-9)
    backbone_weight = "backbone.trunk.layer1.0.conv1.weight"
    assert torch.allclose(recorder.total[names[backbone_weight]], expected[backbone_weight], rtol=1e-9)

    # With an optimizer that moves the weights, stale Z (eps = 1) and exact (eps = I) part ways.
    exact_cfg = _tiny_cfg()
    results = {}
    for label, run_cfg in (("exact", exact_cfg), ("stale", cfg)):
        run_model, _, _ = _float64_problem(run_cfg)
        sgd = torch.optim.SGD(run_model.parameters(), lr=0.1)
        generator = torch.Generator().manual_seed(1)
        patchgd_step(
            run_model, sgd, TensorPatchSource(images, run_model.grid), labels, run_cfg, generator=generator
        )
        results[label] = dict(run_model.named_parameters())
    start = dict(_float64_problem(exact_cfg)[0].named_parameters())
    for name in (head_weight, backbone_weight):
        full_step = start[name] - 0.1 * expected[name]
        assert torch.allclose(results["exact"][name], full_step, rtol=1e-9, atol=1e-12), name
        assert not torch.allclose(results["stale"][name], full_step, rtol=1e-6, atol=1e-9), name


def test_partial_accumulation_windows() -> None:
    # 4 inner iterations in windows of 3 then 1: two optimizer steps, the last window averaged
    # over its own length.
    cfg = _tiny_cfg(accumulation_steps=3)
    model, images, labels = _float64_problem(cfg)
    recorder = GradientRecorder(model.parameters())
    stats = patchgd_step(model, recorder, TensorPatchSource(images, model.grid), labels, cfg)
    assert stats.optimizer_steps == recorder.steps == 2
    head_weight = dict(model.named_parameters())["head.classifier.weight"]
    expected = _full_image_gradients(model, images, labels)["head.classifier.weight"]
    assert torch.allclose(recorder.total[head_weight], 2 * expected, rtol=1e-9)


def test_every_parameter_learns_in_a_training_mode_step() -> None:
    cfg = _tiny_cfg(backbone="mobilenet_v3_small", precision="auto")
    torch.manual_seed(0)
    model = build_patchgd_model(cfg).train()
    recorder = GradientRecorder(model.parameters())
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([1, 0])
    stats = patchgd_step(model, recorder, TensorPatchSource(images, model.grid), labels, cfg)
    for name, p in model.named_parameters():
        grad = recorder.total.get(p)
        assert grad is not None and torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name
    assert stats.num_images == 2
    assert stats.num_patches_encoded == 2 * 16 * 2  # fill pass + one gradient sweep
    assert stats.loss > 0 and stats.seconds > 0

    before = copy.deepcopy(model.state_dict())
    adam = build_optimizer(model, cfg)
    patchgd_step(model, adam, TensorPatchSource(images, model.grid), labels, cfg)
    after = model.state_dict()
    for name, _ in model.named_parameters():
        assert not torch.equal(before[name], after[name]), name


def test_max_inner_iterations_stops_early() -> None:
    cfg = _tiny_cfg()
    model = build_patchgd_model(cfg).train()
    recorder = GradientRecorder(model.parameters())
    stats = patchgd_step(
        model,
        recorder,
        TensorPatchSource(torch.randn(2, 3, 64, 64), model.grid),
        torch.tensor([0, 1]),
        cfg,
        max_inner_iterations=1,
    )
    assert stats.num_patches_encoded == 2 * 16 + 2 * 4
    assert stats.optimizer_steps == 0


def test_baseline_step_updates_every_parameter() -> None:
    cfg = BaselineConfig(num_classes=3, backbone="resnet18", image_size=64)
    torch.manual_seed(0)
    model = build_baseline_model(cfg).train()
    recorder = GradientRecorder(model.parameters())
    stats = baseline_step(model, recorder, torch.randn(2, 3, 64, 64), torch.tensor([0, 2]), cfg)
    assert stats.optimizer_steps == 1 and stats.num_images == 2 and stats.loss > 0
    for name, p in model.named_parameters():
        grad = recorder.total[p]
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_learning_rate_schedule_warms_up_then_decays() -> None:
    factors = [lr_factor(s, warmup_steps=4, total_steps=10) for s in range(10)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4:] == pytest.approx([1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    cfg = _tiny_cfg(epochs=3, warmup_epochs=1, lr_backbone=1e-3, lr_head=2e-3)
    model = build_patchgd_model(cfg)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=2)
    seen = []
    for _ in range(6):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx([5e-4, 1e-3]) and seen[1] == pytest.approx([1e-3, 2e-3])
    assert seen[-1] == pytest.approx([0.25e-3, 0.5e-3])
