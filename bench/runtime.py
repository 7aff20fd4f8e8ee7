"""Resident memory of the runtime itself: the interpreter, torch, the engine and a built model.

The memory benchmark reports each workload's growth over its process's baseline; what a memory
budget must hold is the whole process, i.e. this runtime plus that growth. Each stage runs in a
fresh interpreter (one per backbone), so one stage's leftovers never count in another:

    python -m bench.runtime            # prints a table, writes bench/results/runtime_cpu.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from bench.common import gib, machine, print_table, write_json

# Runs in a fresh interpreter: RSS (bytes) after each stage, printed as one JSON line.
_PROBE = r"""
import gc, json, sys
import psutil

process = psutil.Process()
stages = {"python": process.memory_info().rss}
import torch
torch.set_num_threads(int(sys.argv[1]))
stages["import torch"] = process.memory_info().rss
import worker.patchgd, worker.patchgd.data, worker.patchgd.export, worker.patchgd.memory
import worker.patchgd.train
stages["import engine"] = process.memory_info().rss
backbone = sys.argv[2]
if backbone:
    from worker.patchgd import PatchGDConfig
    from worker.patchgd.models import build_patchgd_model

    model = build_patchgd_model(PatchGDConfig(num_classes=2, backbone=backbone), load_pretrained=False)
    gc.collect()
    stages[f"+ {backbone} PatchGD model"] = process.memory_info().rss
print(json.dumps({"stages": stages, "torch": torch.__version__}))
"""


def _measure(backbone: str, threads: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(threads), backbone], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbones", default="resnet18,resnet50", help="comma-separated; one process each")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (as the benchmarks)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="fresh processes per backbone; the median is kept"
    )
    args = parser.parse_args()

    rows = []
    for backbone in [b for b in args.backbones.split(",") if b]:
        runs = [_measure(backbone, args.threads) for _ in range(args.repeats)]
        for stage in runs[0]["stages"]:
            values = sorted(run["stages"][stage] for run in runs)
            rss = values[len(values) // 2]
            if rows and any(r["stage"] == stage for r in rows):
                continue  # interpreter/torch/engine stages are the same in every backbone's process
            rows.append(
                {
                    "stage": stage,
                    "rss_bytes": rss,
                    "rss_gib": gib(rss),
                    "min_gib": gib(values[0]),
                    "max_gib": gib(values[-1]),
                }
            )
    base = {r["stage"]: r["rss_bytes"] for r in rows}
    for row in rows:
        row["growth_over_python_gib"] = gib(row["rss_bytes"] - base["python"])
    print_table(rows, ["stage", "rss_gib", "min_gib", "max_gib", "growth_over_python_gib"])
    path = write_json(
        "runtime_cpu",
        {
            "benchmark": "runtime",
            "machine": machine("cpu"),
            "settings": {"threads": args.threads, "repeats": args.repeats, "backbones": args.backbones},
            "note": "Whole-process resident memory (RSS, median of fresh processes) after each stage; "
            "model stages are the engine stage plus one PatchGD model (weights=None, fp32).",
            "rows": rows,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
