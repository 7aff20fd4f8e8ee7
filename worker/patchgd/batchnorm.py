"""BatchNorm running statistics under PatchGD: one update per outer step, like one ordinary step.

In train mode a BatchNorm layer normalises with the statistics of the batch it sees and folds
them into its running statistics with momentum 0.1. An ordinary training step runs each layer
once. A PatchGD outer step runs the backbone on every chunk of k patches twice (the no-grad fill
pass and the inner iterations: 2 * I calls for I = n*n / k chunks) and the head I times on an
almost unchanged Z. Left alone, the running statistics then move 2 * I (backbone) or I (head)
times per step: with momentum 0.1 and I = 8, 81 % of the backbone's running statistics come from
the last mini-batch and 57 % of the head's from the last mini-batch alone (4 images by default).
Evaluation, which uses the running statistics, then sees statistics of a handful of images,
not of the training distribution.

``one_update_per_step`` makes every BatchNorm layer run inside the block accumulate the
average of the batch statistics it sees (the cumulative mode of ``momentum=None``) and fold that
average into its running statistics once, with the layer's own momentum, when the block ends.
``frozen_running_stats`` runs layers in train mode (batch statistics, gradient through them)
without touching their running statistics. Normalisation itself is unchanged in both: only the
bookkeeping of the running statistics differs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

_BatchNorm = nn.modules.batchnorm._BatchNorm


def batchnorm_layers(module: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``module`` that keep running statistics."""
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """Train-mode BatchNorm inside the block leaves the running statistics as they were."""
    layers = batchnorm_layers(module)
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in layers]
    try:
        for m in layers:
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
        yield
    finally:
        for m, (momentum, count) in zip(layers, saved, strict=True):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


@contextlib.contextmanager
def one_update_per_step(module: nn.Module) -> Iterator[None]:
    """Each BatchNorm layer run inside the block updates its running statistics once, at the end.

    The update uses the mean of the batch statistics of every call in the block, with the
    layer's momentum (or a cumulative average when its momentum is None). A layer not run inside
    the block keeps its statistics. Without gradients on the statistics: safe around backward.
    """
    layers = batchnorm_layers(module)
    saved = [
        (m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for m in layers
    ]
    try:
        for m in layers:
            m.momentum = None  # cumulative average of the block's batch statistics
            m.num_batches_tracked.zero_()
        yield
    finally:
        with torch.no_grad():
            for m, (momentum, mean, var, count) in zip(layers, saved, strict=True):
                calls = int(m.num_batches_tracked)
                m.momentum = momentum
                if calls == 0:
                    m.running_mean.copy_(mean)
                    m.running_var.copy_(var)
                    m.num_batches_tracked.copy_(count)
                    continue
                factor = 1.0 / float(count + 1) if momentum is None else momentum
                m.running_mean.copy_((1 - factor) * mean + factor * m.running_mean)
                m.running_var.copy_((1 - factor) * var + factor * m.running_var)
                m.num_batches_tracked.copy_(count + 1)
