"""The memory-budget planner at work: requested settings, budget, chosen settings, predicted vs
measured peak (the measured value is the planner's own verification trial).

    python -m bench.planner                  # the CPU scenarios behind docs/benchmarks.md
    python -m bench.planner --scenario patchgd:mobilenet_v3_small:1024:128:16:2:0.3 --name quick

A scenario is ``patchgd:BACKBONE:SIZE:PATCH:K:BATCH:BUDGET_GIB`` or
``baseline:BACKBONE:SIZE:BATCH:BUDGET_GIB``.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from bench.common import machine, print_table, write_json
from worker.patchgd.config import BaselineConfig, PatchGDConfig
from worker.patchgd.memory import GIB, plan_baseline, plan_patchgd

DEFAULT_SCENARIOS = [
    "patchgd:mobilenet_v3_small:4096:256:64:4:0.75",
    "patchgd:resnet18:2048:256:32:2:1.5",
    "patchgd:resnet50:4096:256:16:1:0.3",
    "baseline:mobilenet_v3_small:4096:2:3",
    "baseline:resnet50:2048:1:3",
]


def run_scenario(spec: str, device: str, precision: str) -> dict[str, Any]:
    """Plan one scenario and return a flat, JSON-friendly row."""
    parts = spec.split(":")
    if parts[0] == "patchgd":
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
        plan = plan_patchgd(cfg, float(budget), device)
        requested = f"{size}px P{patch} k={k} batch {batch}"
        chosen = f"k={plan.patches_per_step} batch {plan.batch_size}" if plan.fits else "-"
    elif parts[0] == "baseline":
        _, backbone, size, batch, budget = parts
        cfg_b = BaselineConfig(
            num_classes=4, backbone=backbone, image_size=int(size), batch_size=int(batch), precision=precision
        )
        plan = plan_baseline(cfg_b, float(budget), device)
        requested = f"{size}px batch {batch}"
        chosen = f"{plan.image_size}px batch {plan.batch_size}" if plan.fits else "-"
    else:
        raise SystemExit(f"unknown scenario kind in {spec!r}")
    return {
        "scenario": spec,
        "algorithm": parts[0],
        "backbone": parts[1],
        "requested": requested,
        "budget_gib": float(parts[-1]),
        "fits": plan.fits,
        "chosen": chosen,
        "predicted_gib": None if plan.predicted_bytes is None else round(plan.predicted_bytes / GIB, 3),
        "measured_gib": None if plan.measured_bytes is None else round(plan.measured_bytes / GIB, 3),
        "reason": plan.reason,
        "plan": plan.to_dict(),
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
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    rows = []
    for spec in args.scenario or DEFAULT_SCENARIOS:
        row = run_scenario(spec, args.device, args.precision)
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
                "fits",
            ],
        )
    path = write_json(
        args.name,
        {"benchmark": "planner", "machine": machine(args.device), "settings": vars(args), "rows": rows},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
