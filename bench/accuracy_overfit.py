"""How fast does each model fit a small training set? Optimisation, separated from generalisation.

Trains on the first ``--images`` training canvases of a generated UltraMNIST-style set for
``--epochs`` epochs (engine schedule: warmup, then linear decay) and prints the mean training
loss and the accuracy on those same images (eval mode) per epoch. A model that cannot fit 32
images in a few dozen steps will not generalise in a short budget either.

Usage: python -m bench.accuracy_overfit --algorithm patchgd --set head='"linear"' --tag linear-head
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from bench.common import RESULTS
from worker.patchgd.config import BaselineConfig, PatchGDConfig
from worker.patchgd.data import make_loaders, scan_dataset
from worker.patchgd.train import evaluate, train
from worker.patchgd.ultramnist import make_ultramnist


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--algorithm", choices=["patchgd", "baseline"], default="patchgd")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--set", action="append", default=[], help="config override key=json_value")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = Path(f"/tmp/ultramnist_overfit_{args.size}")
    if not (data / "labels.csv").exists():
        make_ultramnist(data, canvas_size=args.size, counts={"train": args.images, "val": 8}, seed=0)
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    common = {"num_classes": 4, "backbone": "resnet18", "image_size": args.size, "epochs": args.epochs}
    if args.algorithm == "patchgd":
        cfg = PatchGDConfig(**common, patch_size=args.size // 8, precision="fp32", **overrides)
    else:
        cfg = BaselineConfig(**common, precision="fp32", **overrides)
    loaders = make_loaders(
        scan_dataset(data), image_size=args.size, batch_size=cfg.batch_size, cache_dir=data / ".cache", seed=0
    )
    train_set = Subset(loaders["train"].dataset, range(args.images))
    fit_loader = DataLoader(
        train_set, batch_size=cfg.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    same_loader = DataLoader(train_set, batch_size=cfg.batch_size)
    rows = []

    def on_epoch_end(m) -> None:
        rows.append({"epoch": m.epoch + 1, "train_loss": round(m.train_loss, 4)})
        print(json.dumps({"tag": args.tag, **rows[-1]}), flush=True)

    result = train(cfg, fit_loader, None, device="cpu", on_epoch_end=on_epoch_end)
    fitted = evaluate(result.model, same_loader, cfg, torch.device("cpu"))
    out = {
        "tag": args.tag,
        "algorithm": args.algorithm,
        "overrides": overrides,
        "images": args.images,
        "epochs": rows,
        "train_accuracy_eval_mode": fitted["accuracy"],
        "train_loss_eval_mode": fitted["loss"],
    }
    print(json.dumps(out), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"accuracy_overfit_{args.tag}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
