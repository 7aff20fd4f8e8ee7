"""Why PatchGD trails the full-image baseline: one suspect at a time, small and decisive.

Trains PatchGD (engine defaults unless overridden) on a generated UltraMNIST-style dataset and,
after every epoch, scores the validation split three ways:

- ``eval``: the ordinary evaluation (eval-mode BatchNorm, running statistics);
- ``batchstats``: BatchNorm normalising each chunk with its own statistics, as in training
  (dropout off): if this is far above ``eval``, the running statistics are the problem;
- ``recal``: running statistics recomputed from scratch over the training split (one fill pass
  per batch, cumulative average), then eval mode.

Usage: python -m bench.accuracy_diagnosis --size 256 --patch 32 --epochs 3 --set key=value ...
Prints one JSON line per epoch and writes ``bench/results/accuracy_diagnosis_<tag>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from worker.patchgd.config import PatchGDConfig
from worker.patchgd.data import make_loaders, scan_dataset
from worker.patchgd.grid import TensorPatchSource
from worker.patchgd.metrics import classification_report
from worker.patchgd.train import evaluate, train
from worker.patchgd.ultramnist import make_ultramnist

RESULTS = Path(__file__).parent / "results"


def _bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def score_batchstats(model, loader, cfg) -> dict:
    """Validation with train-mode BatchNorm (chunks of k patches, as in training), dropout off."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout | nn.Dropout2d):
            m.eval()
    saved = [
        (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for m in _bn_layers(model)
    ]
    y_true, y_pred = [], []
    for images, labels in loader:
        source = TensorPatchSource(images, cfg.grid)
        order = torch.randperm(cfg.grid.num_patches, generator=torch.Generator().manual_seed(0))
        z = model.fill_latent(source, list(order.split(cfg.k)))
        y_pred += model.classify(z).argmax(1).tolist()
        y_true += labels.tolist()
    for m, (mean, var, count) in zip(_bn_layers(model), saved, strict=True):
        m.running_mean.copy_(mean), m.running_var.copy_(var), m.num_batches_tracked.copy_(count)
    model.eval()
    return classification_report(y_true, y_pred, cfg.num_classes)


@torch.no_grad()
def recalibrate(model, loader, cfg) -> None:
    """Recompute every BatchNorm's running statistics over ``loader`` (cumulative average)."""
    layers = _bn_layers(model)
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout | nn.Dropout2d):
            m.eval()
    for images, _ in loader:
        source = TensorPatchSource(images, cfg.grid)
        order = torch.randperm(cfg.grid.num_patches, generator=torch.Generator().manual_seed(0))
        model.classify(model.fill_latent(source, list(order.split(cfg.k))))
    for m in layers:
        m.momentum = 0.1
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--val", type=int, default=150)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="defaults")
    parser.add_argument(
        "--legacy-bn",
        action="store_true",
        help="every BatchNorm call of a step updates the running statistics (the engine before the fix)",
    )
    parser.add_argument("--set", action="append", default=[], help="config override key=json_value")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.legacy_bn:
        import contextlib

        import worker.patchgd.train as engine_train

        engine_train.one_update_per_step = lambda module: contextlib.nullcontext()
        engine_train.frozen_running_stats = lambda module: contextlib.nullcontext()
    data = Path(f"/tmp/ultramnist_{args.size}_{args.train}_{args.val}")
    if not (data / "labels.csv").exists():
        make_ultramnist(data, canvas_size=args.size, counts={"train": args.train, "val": args.val}, seed=0)
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    cfg = PatchGDConfig(
        num_classes=4,
        backbone="resnet18",
        image_size=args.size,
        patch_size=args.patch,
        epochs=args.epochs,
        precision="fp32",
        **overrides,
    )
    loaders = make_loaders(
        scan_dataset(data), image_size=args.size, batch_size=cfg.batch_size, cache_dir=data / ".cache", seed=0
    )
    rows = []

    def on_epoch_end(m) -> None:
        model = state["model"]
        row = {
            "epoch": m.epoch,
            "train_loss": round(m.train_loss, 4),
            "seconds": round(m.seconds, 1),
            "eval_acc": m.val_accuracy,
            "eval_qwk": m.val_qwk,
        }
        bs = score_batchstats(model, loaders["val"], cfg)
        row |= {"batchstats_acc": bs["accuracy"], "batchstats_qwk": bs["qwk"]}
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        recalibrate(model, loaders["train"], cfg)
        rc = evaluate(model, loaders["val"], cfg, torch.device("cpu"))
        row |= {"recal_acc": rc["accuracy"], "recal_qwk": rc["qwk"]}
        model.load_state_dict(saved)
        model.train()
        rows.append(row)
        print(json.dumps(row), flush=True)

    # The model is only reachable after train() returns; hook it through the builder instead.
    import worker.patchgd.train as engine_train

    state: dict = {}
    original = engine_train.build_patchgd_model

    def capture(*a, **kw):
        state["model"] = original(*a, **kw)
        return state["model"]

    engine_train.build_patchgd_model = capture
    started = time.perf_counter()
    train(cfg, loaders["train"], loaders["val"], device="cpu", on_epoch_end=on_epoch_end)
    RESULTS.mkdir(exist_ok=True)
    out = {
        "tag": args.tag,
        "legacy_bn": args.legacy_bn,
        "epochs_trained": args.epochs,
        "size": args.size,
        "patch": args.patch,
        "overrides": overrides,
        "train": args.train,
        "val": args.val,
        "seconds": round(time.perf_counter() - started),
        "epochs": rows,
    }
    (RESULTS / f"accuracy_diagnosis_{args.tag}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
