"""BatchNorm running statistics under PatchGD move once per outer step, like one ordinary step."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from worker.patchgd.batchnorm import batchnorm_layers, frozen_running_stats, one_update_per_step
from worker.patchgd.config import BaselineConfig, PatchGDConfig
from worker.patchgd.grid import TensorPatchSource
from worker.patchgd.models import build_patchgd_model
from worker.patchgd.train import build_optimizer, patchgd_step, recalibrate_batchnorm, train


def test_one_update_per_step_folds_in_the_mean_of_the_batch_statistics() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3).train()
    bn.running_mean.fill_(1.0)
    bn.running_var.fill_(2.0)
    batches = [torch.randn(5, 3) * (i + 1) + i for i in range(3)]
    expected_out = [nn.functional.batch_norm(b, None, None, training=True) for b in batches]
    with one_update_per_step(bn):
        outputs = [bn(b) for b in batches]
    mean = torch.stack([b.mean(0) for b in batches]).mean(0)
    var = torch.stack([b.var(0, unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, 0.9 * torch.ones(3) + 0.1 * mean)
    torch.testing.assert_close(bn.running_var, 0.9 * 2 * torch.ones(3) + 0.1 * var)
    assert int(bn.num_batches_tracked) == 1 and bn.momentum == 0.1
    for out, ref in zip(outputs, expected_out, strict=True):  # normalisation itself unchanged
        torch.testing.assert_close(out, ref)


def test_layers_not_run_and_frozen_layers_keep_their_statistics() -> None:
    bn = nn.BatchNorm1d(2).train()
    bn.running_mean.fill_(0.5)
    with one_update_per_step(bn):
        pass
    assert torch.equal(bn.running_mean, torch.full((2,), 0.5)) and int(bn.num_batches_tracked) == 0
    with frozen_running_stats(bn):
        bn(torch.randn(4, 2) + 3)
    assert torch.equal(bn.running_mean, torch.full((2,), 0.5)) and int(bn.num_batches_tracked) == 0
    assert bn.momentum == 0.1


def test_a_patchgd_step_updates_every_batchnorm_once() -> None:
    torch.manual_seed(0)
    cfg = PatchGDConfig(
        num_classes=3, backbone="resnet18", image_size=64, patch_size=16, sampling=0.25,
        latent_dim=8, head_width=8, precision="fp32",
    )  # fmt: skip
    model = build_patchgd_model(cfg).train()
    optimizer = build_optimizer(model, cfg)
    source = TensorPatchSource(torch.randn(2, 3, 64, 64), cfg.grid)
    patchgd_step(model, optimizer, source, torch.tensor([0, 2]), cfg)
    # Before: the backbone's layers moved 2 * 4 times (fill + inner chunks), the head's 4 times.
    counts = {int(m.num_batches_tracked) for m in batchnorm_layers(model)}
    assert counts == {1}


def test_recalibration_forgets_the_old_statistics_and_averages_the_given_batches() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(3)).double()
    bn = model[0]
    bn.running_mean.fill_(50.0)  # stale statistics, far from the data
    bn.running_var.fill_(0.01)
    batches = [(torch.randn(6, 3, dtype=torch.float64) * (i + 1) + i, None) for i in range(3)]
    cfg = BaselineConfig(num_classes=2, backbone="resnet18", image_size=32)
    model.eval()
    assert recalibrate_batchnorm(model, batches, cfg, torch.device("cpu")) == 3
    assert not model.training and bn.momentum == 0.1  # mode and momentum as they were
    mean = torch.stack([b.mean(0) for b, _ in batches]).mean(0)
    var = torch.stack([b.var(0, unbiased=True) for b, _ in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    # No batches: nothing to estimate from, the statistics stay.
    before = bn.running_mean.clone()
    assert recalibrate_batchnorm(model, [], cfg, torch.device("cpu")) == 0
    torch.testing.assert_close(bn.running_mean, before)


def test_recalibration_at_epoch_ends_changes_no_weight_and_no_data_order() -> None:
    """The re-estimate reads the training set in dataset order with a generator of its own: the
    weights after training are bit-identical with it on or off (only the statistics differ)."""

    def run(batches: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(8, 3, 32, 32, generator=generator)
        labels = torch.arange(8) % 2
        loader = DataLoader(TensorDataset(images, labels), batch_size=4, shuffle=True, generator=generator)
        cfg = PatchGDConfig(
            num_classes=2,
            backbone="resnet18",
            image_size=32,
            patch_size=16,
            latent_dim=8,
            head_width=8,
            epochs=2,
            batch_size=4,
            precision="fp32",
            bn_recalibration_batches=batches,
        )
        result = train(cfg, loader, None, device="cpu")
        return {k: v.clone() for k, v in result.model.state_dict().items()}

    on, off = run(2), run(0)
    weights = [k for k in on if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert weights and all(torch.equal(on[k], off[k]) for k in weights)
    statistics = [k for k in on if k.endswith("running_mean")]
    assert any(not torch.equal(on[k], off[k]) for k in statistics)
