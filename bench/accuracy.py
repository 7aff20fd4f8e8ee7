"""Does PatchGD learn as well as the full-image baseline? Learning curves on UltraMNIST-style data.

For each canvas size S, on the same generated dataset (``worker.patchgd.ultramnist``: 3-5 real
MNIST digits of very different sizes, one tiny; label = digit sum in 4 ordinal buckets), with
equal epochs, batch size, seed and engine defaults otherwise (resnet18 from random init, fp32):

- ``patchgd``: PatchGD at S with patch S/8 (an 8 x 8 grid);
- ``baseline``: the full-image baseline at S;
- ``baseline-downscaled``: the baseline at the largest resolution (a multiple of 32) whose
  predicted peak, by the engine's calibrated memory model (``estimate_baseline_bytes``), is no
  more than PatchGD's predicted peak at S (``estimate_patchgd_bytes``): the resolution the
  baseline is left with under PatchGD's memory budget. The batch size is kept, so the runs differ
  only in what the model sees.

Every run is a fresh subprocess (its peak resident memory is its own). Writes
``bench/results/accuracy_cpu.json`` (per-epoch curves, final metrics, time per epoch, peak
memory) and ``accuracy_cpu.png``, and prints a table. Validation is the held-out ``val`` split
(canvases composed from digits no training canvas uses); the final model is reported, not the
best epoch.

Usage: python -m bench.accuracy [--sizes 256 512] [--train 300] [--val 150] [--epochs 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from bench.common import RESULTS, machine, print_table, write_json
from worker.patchgd.config import BaselineConfig, PatchGDConfig
from worker.patchgd.data import make_loaders, scan_dataset
from worker.patchgd.memory import calibrate_backbone, estimate_baseline_bytes, estimate_patchgd_bytes
from worker.patchgd.train import train
from worker.patchgd.ultramnist import make_ultramnist

BACKBONE = "resnet18"
GRID = 8


def patchgd_config(size: int, epochs: int, grid: int = GRID) -> PatchGDConfig:
    return PatchGDConfig(
        num_classes=4,
        backbone=BACKBONE,
        image_size=size,
        patch_size=size // grid,
        epochs=epochs,
        precision="fp32",
    )


def baseline_config(size: int, epochs: int) -> BaselineConfig:
    return BaselineConfig(num_classes=4, backbone=BACKBONE, image_size=size, epochs=epochs, precision="fp32")


def downscaled_size(size: int, epochs: int, grid: int = GRID) -> tuple[int, dict[str, float]]:
    """The largest baseline resolution (multiple of 32) predicted to fit PatchGD's predicted peak.

    PatchGD's peak is predicted at the engine's default sampling (k = n*n / 8 patches with
    gradient at a time), the memory-bounded regime, whatever sampling a CPU run trains with.
    """
    calibration = calibrate_backbone(BACKBONE, device="cpu", cache_file=RESULTS / "calibration_cpu.json")
    terms = {"bytes_per_pixel": calibration.bytes_per_pixel, "overhead_bytes": calibration.overhead_bytes}
    budget = estimate_patchgd_bytes(patchgd_config(size, epochs, grid), **terms).total_bytes
    base = baseline_config(size, epochs)
    fitting = [
        s
        for s in range(32, size + 1, 32)
        if estimate_baseline_bytes(base, **terms, image_size=s).total_bytes <= budget
    ]
    chosen = max(fitting) if fitting else 32
    return chosen, {
        "budget_gib": round(budget / 2**30, 3),
        "baseline_full_predicted_gib": round(estimate_baseline_bytes(base, **terms).total_bytes / 2**30, 3),
        "baseline_downscaled_predicted_gib": round(
            estimate_baseline_bytes(base, **terms, image_size=chosen).total_bytes / 2**30, 3
        ),
    }


def run_one(
    method: str,
    data: str,
    size: int,
    model_size: int,
    epochs: int,
    threads: int,
    overrides: dict | None = None,
    grid: int = GRID,
    sampling: float | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train one model (in this process) and return its curve and final metrics."""
    torch.set_num_threads(threads)
    if method == "patchgd":
        cfg: PatchGDConfig | BaselineConfig = dataclasses.replace(
            patchgd_config(size, epochs, grid), sampling=sampling
        )
    elif method == "patchgd-stale-z":
        # The reference's regime: one optimizer step per inner iteration (eps = 1).
        cfg = dataclasses.replace(patchgd_config(size, epochs, grid), sampling=sampling, accumulation_steps=1)
    else:
        cfg = baseline_config(model_size, epochs)
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    loaders = make_loaders(
        scan_dataset(data),
        image_size=cfg.image_size,
        batch_size=cfg.batch_size,
        cache_dir=Path(data) / ".cache",
    )
    curve: list[dict[str, Any]] = []

    def on_epoch_end(m) -> None:  # noqa: ANN001 - EpochMetrics
        curve.append(
            {
                "epoch": m.epoch + 1,
                "train_loss": round(m.train_loss, 4),
                "val_loss": round(m.val_loss, 4),
                "val_accuracy": round(m.val_accuracy, 4),
                "val_qwk": round(m.val_qwk, 4),
                "seconds": round(m.seconds, 1),
            }
        )
        label = method + "".join(f" {k}={v}" for k, v in (overrides or {}).items())
        print(json.dumps({"method": label, "size": size, **curve[-1]}), file=sys.stderr, flush=True)

    result = train(cfg, loaders["train"], loaders["val"], device=device, on_epoch_end=on_epoch_end)
    final = result.final or {}
    return {
        "method": method,
        "canvas": size,
        "model_input": cfg.image_size,
        "patch": cfg.patch_size if isinstance(cfg, PatchGDConfig) else None,
        "accumulation_steps": cfg.num_accumulation_steps if isinstance(cfg, PatchGDConfig) else None,
        "config": cfg.to_dict(),
        "curve": curve,
        "val_accuracy": final.get("accuracy"),
        "val_qwk": final.get("qwk"),
        # Training time only (evaluation excluded): the mean of the epochs' step time.
        "seconds_per_epoch": round(sum(c["seconds"] for c in curve) / len(curve), 1),
        "peak_rss_gib": round(psutil.Process().memory_info().rss / 2**30, 3),
        "peak_rss_hwm_gib": round(_rss_high_water_mark() / 2**30, 3),
    }


def _rss_high_water_mark() -> int:
    """VmHWM: the process's peak resident set size (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["canvas"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4), squeeze=False)
    styles = {"patchgd-stale-z": "-.o", "patchgd": "-o", "baseline": "-s", "baseline-downscaled": "--^"}
    for ax, size in zip(axes[0], sizes, strict=True):
        for r in (r for r in rows if r["canvas"] == size):
            epochs = [c["epoch"] for c in r["curve"]]
            label = f"{r['method']} ({r['model_input']} px)"
            ax.plot(
                epochs, [c["val_accuracy"] for c in r["curve"]], styles.get(r["method"], "-.x"), label=label
            )
        ax.axhline(0.25, color="grey", lw=0.8, ls=":", label="chance")
        ax.set_title(f"UltraMNIST-style {size}² canvases, resnet18 from scratch")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation accuracy (4 classes)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def collect(
    logs: list[str], name: str, epochs: int, grid: int = GRID, extra_rows: list[dict[str, Any]] | None = None
) -> None:
    """Curves from the epoch lines of stopped or finished runs, saved like a full run's results."""
    curves: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for log in logs:
        for line in Path(log).read_text().splitlines():
            if not line.startswith('{"method"'):
                continue
            entry = json.loads(line)
            key = (entry.pop("method"), entry.pop("size"))
            curves.setdefault(key, []).append(entry)
    rows = []
    for (method, size), curve in sorted(curves.items(), key=lambda item: (item[0][1], item[0][0])):
        last = curve[-1]
        rows.append(
            {
                "method": method,
                "canvas": size,
                "model_input": downscaled_size(size, epochs, grid)[0]
                if method == "baseline-downscaled"
                else size,
                "memory_model": downscaled_size(size, epochs, grid)[1],
                "curve": curve,
                "epochs_completed": len(curve),
                "val_accuracy": last["val_accuracy"],
                "val_qwk": last["val_qwk"],
                "seconds_per_epoch": round(sum(c["seconds"] for c in curve) / len(curve), 1),
            }
        )
    rows = sorted(rows + (extra_rows or []), key=lambda r: (r["canvas"], r["method"]))
    write_json(
        name,
        {
            "benchmark": "accuracy",
            "collected_from_logs": True,
            "epochs_planned": epochs,
            "grid": grid,
            "rows": rows,
        },
    )
    plot(rows, RESULTS / f"{name}.png")
    print_table(
        [
            {
                k: r[k]
                for k in (
                    "canvas",
                    "method",
                    "epochs_completed",
                    "val_accuracy",
                    "val_qwk",
                    "seconds_per_epoch",
                )
                if k in r
            }
            for r in rows
        ],
        ["canvas", "method", "epochs_completed", "val_accuracy", "val_qwk", "seconds_per_epoch"],
    )


def _reused_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows of the methods not trained now, from an earlier results file with the same data settings."""
    earlier = json.loads(Path(args.reuse).read_text())
    settings = earlier.get("settings", {})
    for key in ("train", "val", "epochs"):
        if settings.get(key) != getattr(args, key):
            raise SystemExit(
                f"{args.reuse}: {key} was {settings.get(key)}, this run has {getattr(args, key)}"
            )
    rows = []
    for row in earlier["rows"]:
        if row["canvas"] in args.sizes and row["method"] not in args.methods:
            rows.append({**row, "epochs_completed": len(row["curve"]), "reused_from": str(args.reuse)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--val", type=int, default=150)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu or cuda (the downscaled resolution still comes from the CPU-calibrated memory model)",
    )
    parser.add_argument(
        "--grid", type=int, default=GRID, help="PatchGD patches per side (patch = size / grid)"
    )
    parser.add_argument(
        "--sampling",
        type=float,
        default=None,
        help="PatchGD training sampling (default: the engine's 1/8). In the exact regime every k gives "
        "the same full-image gradient, up to BatchNorm's per-chunk statistics: a larger k only "
        "trades memory for CPU time. The downscaled baseline's budget is always PatchGD's at 1/8.",
    )
    parser.add_argument(
        "--methods", nargs="+", default=["patchgd", "baseline", "baseline-downscaled"], help="runs to train"
    )
    parser.add_argument(
        "--reuse",
        default=None,
        help="results JSON of an earlier run with the same data settings: its rows of the methods not "
        "trained now are copied (marked reused_from), e.g. baselines when only PatchGD changed",
    )
    parser.add_argument("--set", action="append", default=[], help="with --one: config override key=json")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
    parser.add_argument("--data-root", default="/tmp/tessera_accuracy")
    parser.add_argument("--name", default="accuracy_cpu")
    parser.add_argument(
        "--one", nargs=4, metavar=("METHOD", "DATA", "SIZE", "MODEL_SIZE"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--collect",
        nargs="+",
        metavar="LOG",
        help="rebuild the JSON/PNG from the per-epoch lines runs print on stderr (runs cut short included)",
    )
    args = parser.parse_args()
    if args.collect:
        collect(args.collect, args.name, args.epochs, args.grid, _reused_rows(args) if args.reuse else None)
        return
    if args.one:
        method, data, size, model_size = args.one
        overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
        print(
            json.dumps(
                run_one(
                    method,
                    data,
                    int(size),
                    int(model_size),
                    args.epochs,
                    args.threads,
                    overrides,
                    args.grid,
                    args.sampling,
                    args.device,
                )
            )
        )
        return

    started = time.perf_counter()
    budgets: dict[int, dict[str, float]] = {}
    jobs: list[tuple[list[str], dict[str, float]]] = []
    for size in args.sizes:
        data = Path(args.data_root) / f"ultramnist_{size}_{args.train}_{args.val}"
        if not (data / "labels.csv").exists():
            make_ultramnist(data, canvas_size=size, counts={"train": args.train, "val": args.val}, seed=0)
        small, budgets[size] = downscaled_size(size, args.epochs, args.grid)
        for method, model_size in (("patchgd", size), ("baseline", size), ("baseline-downscaled", small)):
            if method not in args.methods:
                continue
            command = [
                sys.executable,
                "-m",
                "bench.accuracy",
                "--epochs",
                str(args.epochs),
                "--threads",
                str(args.threads),
                "--grid",
                str(args.grid),
                "--device",
                args.device,
                *(["--sampling", str(args.sampling)] if args.sampling is not None else []),
                "--one",
                method,
                str(data),
                str(size),
                str(model_size),
            ]
            jobs.append((command, budgets[size]))
    reused = _reused_rows(args) if args.reuse else []
    # Runs are independent processes; --parallel N runs N at a time (times per epoch then include
    # the contention between them, on top of whatever else shares the machine).
    rows: list[dict[str, Any]] = []
    pending = list(jobs)
    running: list[tuple[subprocess.Popen, dict[str, float]]] = []
    while pending or running:
        while pending and len(running) < args.parallel:
            command, budget = pending.pop(0)
            running.append((subprocess.Popen(command, stdout=subprocess.PIPE, text=True), budget))
        process, budget = running.pop(0)
        out, _ = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"a run failed: {process.args}")
        row = json.loads(out.strip().splitlines()[-1])
        row["memory_model"] = budget
        rows.append(row)
        # Saved after every finished run, so a long run that is stopped keeps what it measured.
        write_json(args.name, {"benchmark": "accuracy", "partial": True, "rows": rows})
    rows = sorted(rows + reused, key=lambda r: (r["canvas"], r["method"]))
    payload = {
        "benchmark": "accuracy",
        "machine": machine(args.device),
        "settings": {
            "sizes": args.sizes,
            "train": args.train,
            "val": args.val,
            "epochs": args.epochs,
            "backbone": BACKBONE,
            "grid": args.grid,
            "patchgd_sampling": args.sampling if args.sampling is not None else 0.125,
            "reused_from": args.reuse,
            "seed": 0,
            "precision": "fp32",
            "note": "CPU shared with other jobs: times are noisy",
        },
        "budgets": budgets,
        "rows": rows,
        "seconds": round(time.perf_counter() - started),
    }
    write_json(args.name, payload)
    plot(rows, RESULTS / f"{args.name}.png")
    print_table(
        [
            {
                "canvas": r["canvas"],
                "method": r["method"],
                "input px": r["model_input"],
                "val acc": f"{r['val_accuracy']:.3f}",
                "val QWK": f"{r['val_qwk']:.3f}",
                "s/epoch": r["seconds_per_epoch"],
                "peak RSS GiB": r["peak_rss_hwm_gib"],
                "predicted GiB": r["memory_model"]["budget_gib"]
                if r["method"] == "patchgd"
                else r["memory_model"]["baseline_full_predicted_gib"]
                if r["method"] == "baseline"
                else r["memory_model"]["baseline_downscaled_predicted_gib"],
            }
            for r in rows
        ],
        ["canvas", "method", "input px", "val acc", "val QWK", "s/epoch", "peak RSS GiB", "predicted GiB"],
    )


if __name__ == "__main__":
    main()
