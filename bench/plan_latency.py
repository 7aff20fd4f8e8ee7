"""How long a memory plan of both algorithms takes, with and without a cached calibration.

    python -m bench.plan_latency            # bench/results/plan_latency_cpu.json

Each plan runs the ``memory.plan`` job's body (``worker.tasks.training.make_plan``, prediction
only, as the new-task form's Plan button asks) in a fresh interpreter, like a worker process that
just started: first with an empty calibration cache (the backbone is calibrated: two measured
forward/backward runs per patch size, each in a child interpreter), then again with the cache file
that run left (``<data_dir>/memory_calibration.json``), and a second plan in that same process
(``next_plan_s``: what a light worker's pool process that already answered one plan takes).
``*_s`` is the job's own clock; ``import_s`` is importing the engine's memory model first (a
light worker's pool process does that in a background thread as soon as it starts), and
``*_wall_s`` includes everything (interpreter start-up, imports, the calibration's children).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import machine, print_table, write_json

# (backbone, image size, patch size, k, batch, budget GiB)
SCENARIOS = [
    ("resnet18", 4096, 256, 64, 1, 4.0),
    ("mobilenet_v3_small", 8192, 256, 32, 1, 2.0),
]

ONE = """
import json, sys, time
from pathlib import Path
started = time.monotonic()
import worker.patchgd.memory  # what a pool process's warm-up thread imports when it starts
imported = time.monotonic() - started
from backend.config import Settings
from worker.tasks.training import make_plan
from worker.patchgd.config import PatchGDConfig, BaselineConfig
backbone, size, patch, k, batch, budget, data_dir = json.loads(sys.argv[1])
common = dict(num_classes=4, backbone=backbone, image_size=size, batch_size=batch)
configs = {
    "patchgd": PatchGDConfig(**common, patch_size=patch, patches_per_step=k).to_dict(),
    "baseline": BaselineConfig(**common).to_dict(),
}
settings = Settings(data_dir=Path(data_dir), database_url="", broker_url="")
report = make_plan(settings, "bench", configs, budget, device="cpu", verify=False, primary="patchgd")
again = make_plan(settings, "bench2", configs, budget, device="cpu", verify=False, primary="patchgd")
report["again_seconds"] = again["seconds"]
report["import_seconds"] = round(imported, 3)
print("REPORT" + json.dumps(report))
"""


def run_once(spec: tuple[Any, ...], data_dir: Path) -> dict[str, Any]:
    """Plan ``spec`` in a fresh interpreter; the job's report and the wall time."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", ONE, json.dumps([*spec, str(data_dir)])],
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.monotonic() - started
    line = next(x for x in done.stdout.splitlines() if x.startswith("REPORT"))
    return {"report": json.loads(line[len("REPORT") :]), "wall_s": round(wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="plan_latency_cpu")
    args = parser.parse_args()
    from backend.training.plans import plan_sentence

    rows = []
    for spec in SCENARIOS:
        with tempfile.TemporaryDirectory() as folder:
            cold = run_once(spec, Path(folder))
            warm = run_once(spec, Path(folder))
        backbone, size, patch, k, batch, budget = spec
        rows.append(
            {
                "scenario": f"{backbone} {size}² P{patch} k={k} batch {batch}, {budget:g} GiB",
                "import_s": warm["report"]["import_seconds"],
                "cold_s": cold["report"]["seconds"],
                "cold_wall_s": cold["wall_s"],
                "warm_s": warm["report"]["seconds"],
                "warm_wall_s": warm["wall_s"],
                "next_plan_s": warm["report"]["again_seconds"],
                "sentence": plan_sentence(warm["report"]),
                "report": warm["report"],
            }
        )
        print(rows[-1]["scenario"], rows[-1]["cold_s"], rows[-1]["warm_s"], rows[-1]["sentence"], flush=True)
    print_table(
        rows, ["scenario", "import_s", "cold_s", "cold_wall_s", "warm_s", "warm_wall_s", "next_plan_s"]
    )
    path = write_json(args.name, {"machine": machine("cpu"), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
