"""BatchNorm running statistics under PatchGD move once per outer step, like one ordinary step."""

from __future__ import annotations

import torch
from torch import nn

from worker.patchgd.batchnorm import batchnorm_layers, frozen_running_stats, one_update_per_step
from worker.patchgd.config import PatchGDConfig
from worker.patchgd.grid import TensorPatchSource
from worker.patchgd.models import build_patchgd_model
from worker.patchgd.train import build_optimizer, patchgd_step


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
