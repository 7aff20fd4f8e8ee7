"""The memory-budget planner at work: requested settings, budget, chosen settings, predicted vs
measured peak (the measured value is the planner's own verification trial) and the error.

    python -m bench.planner                  # the CPU scenarios behind docs/benchmarks.md
    python -m bench.planner --scenario patchgd:mobilenet_v3_small:1024:128:16:2:0.3 --name quick

A scenario is ``patchgd:BACKBONE:SIZE:PATCH:K:BATCH:BUDGET_GIB`` (``patchgd-streamed:...`` for a
streamed image: patches made on demand, the image never in memory) or
``baseline:BACKBONE:SIZE:BATCH:BUDGET_GIB``. Scenarios with a budget far above the request measure
the model's accuracy at the requested settings; tight ones show the planner shrinking them.

``measured`` is the growth of the trial process over its baseline (interpreter + torch + libraries,
before the model is built); ``process`` is the whole process's peak, baseline included: what the
machine must hold. ``error`` is (predicted - measured) / measured of the growth.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from bench.common import machine, print_table, write_json
from worker.patchgd.config import BaselineConfig, PatchGDConfig
from worker.patchgd.memory import GIB, plan

ACCURACY_BACKBONES = ["resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0"]
# Accuracy: every backbone at 512^2 (P 128), 2048^2 (P 256) in memory and 8192^2 (P 256) streamed,
# the ResNets also at 8192^2 in memory; k = 8, batch 1, under a budget large enough that the
# request itself is measured. Sized to finish in about 15 minutes on 2 shared cores.
ACCURACY_SCENARIOS = [
    f"{kind}:{backbone}:{size}:{patch}:8:1:16"
    for backbone in ACCURACY_BACKBONES
    for kind, size, patch in [
        ("patchgd", 512, 128),
        ("patchgd", 2048, 256),
        ("patchgd", 8192, 256),
        ("patchgd-streamed", 8192, 256),
    ]
    if size != 8192 or kind == "patchgd-streamed" or backbone.startswith("resnet")
] + [f"baseline:{backbone}:1024:1:16" for backbone in ("resnet18", "mobilenet_v3_small")]
# The planner shrinking a request to a tight budget.
BUDGET_SCENARIOS = [
    "patchgd:mobilenet_v3_small:4096:256:64:4:0.75",
    "patchgd-streamed:resnet18:16384:256:32:1:0.75",
    "baseline:resnet50:2048:1:3",
]
DEFAULT_SCENARIOS = ACCURACY_SCENARIOS + BUDGET_SCENARIOS


def run_scenario(spec: str, device: str, precision: str, cache_file: str | None = None) -> dict[str, Any]:
    """Plan one scenario and return a flat, JSON-friendly row."""
    parts = spec.split(":")
    streamed = parts[0] == "patchgd-streamed"
    if parts[0] in ("patchgd", "patchgd-streamed"):
        _, backbone, size, patch, k, batch, budget = parts
        cfg = PatchGDConfig(
            num_classes=4,
            backbone=backbone,
            image_size=int(size),
            patch_size=int(patch),
            patches_per_step=int(k),
            batch_size=int(batch),
            precision=precision,
        )
        result = plan(cfg, float(budget), device, streamed=streamed, cache_file=cache_file)
        requested = f"{size}px P{patch} k={k} batch {batch}" + (" streamed" if streamed else "")
        chosen = f"k={result.patches_per_step} batch {result.batch_size}" if result.fits else "-"
    elif parts[0] == "baseline":
        _, backbone, size, batch, budget = parts
        cfg_b = BaselineConfig(
            num_classes=4, backbone=backbone, image_size=int(size), batch_size=int(batch), precision=precision
        )
        result = plan(cfg_b, float(budget), device, cache_file=cache_file)
        requested = f"{size}px batch {batch}"
        chosen = f"{result.image_size}px batch {result.batch_size}" if result.fits else "-"
    else:
        raise SystemExit(f"unknown scenario kind in {spec!r}")
    predicted, measured = result.predicted_bytes, result.measured_bytes
    trial = result.trials[-1] if result.trials else {}
    process = None
    if measured is not None and trial.get("baseline_bytes") is not None:
        process = measured + trial["baseline_bytes"]
    error = None if predicted is None or not measured else (predicted - measured) / measured
    return {
        "scenario": spec,
        "algorithm": parts[0],
        "backbone": parts[1],
        "requested": requested,
        "budget_gib": float(parts[-1]),
        "fits": result.fits,
        "chosen": chosen,
        "predicted_gib": None if predicted is None else round(predicted / GIB, 3),
        "measured_gib": None if measured is None else round(measured / GIB, 3),
        "error_pct": None if error is None else round(100 * error, 1),
        "process_gib": None if process is None else round(process / GIB, 3),
        "reason": result.reason,
        "plan": result.to_dict(),
    }


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scenario", action="append", default=[], help="repeatable; see the module doc")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--name", default="planner_cpu")
    parser.add_argument(
        "--calibration", default=None, help="calibration cache file (default: calibrate afresh in this run)"
    )
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    rows = []
    for spec in args.scenario or DEFAULT_SCENARIOS:
        row = run_scenario(spec, args.device, args.precision, args.calibration)
        rows.append(row)
        print_table(
            [row],
            [
                "algorithm",
                "backbone",
                "requested",
                "budget_gib",
                "chosen",
                "predicted_gib",
                "measured_gib",
                "error_pct",
                "process_gib",
                "fits",
            ],
        )
        # Written after every scenario, so a long sweep stopped early keeps what it measured.
        path = write_json(
            args.name,
            {"benchmark": "planner", "machine": machine(args.device), "settings": vars(args), "rows": rows},
        )
    errors = [abs(r["error_pct"]) for r in rows if r["error_pct"] is not None]
    if errors:
        print(f"largest |error|: {max(errors):.1f}% over {len(errors)} measured plans")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
