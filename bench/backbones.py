"""What the Backbones page shows for each built-in: parameters and training memory per megapixel.

Runs the same engine function as the ``backbones.measure`` job (``describe_architecture``: a
measured calibration of the backbone, then the engine's memory model) for every catalog
architecture and writes ``bench/results/backbones_<device>.json``.

    python -m bench.backbones [--device cpu] [--patch-size 128]
"""

from __future__ import annotations

import argparse
import time

from bench.common import machine, print_table, write_json
from worker.patchgd.backbones import describe_architecture
from worker.patchgd.catalog import list_backbones

MIB = 2**20


def main() -> None:
    """Measure every catalog backbone and print a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--patch-size", type=int, default=128)
    args = parser.parse_args()
    rows = []
    for name in list_backbones():
        started = time.perf_counter()
        described = describe_architecture(name, device=args.device, patch_size=args.patch_size)
        memory = described["memory"]
        rows.append(
            {
                "backbone": name,
                "params_m": round(described["param_count"] / 1e6, 2),
                "activation_b_per_px": memory["activation_bytes_per_pixel"],
                "baseline_mib_per_mp": round(memory["baseline_bytes_per_megapixel"] / MIB, 1),
                "patchgd_mib_per_mp": round(memory["patchgd_bytes_per_megapixel"] / MIB, 2),
                "patchgd_streamed_mib_per_mp": round(memory["patchgd_streamed_bytes_per_megapixel"] / MIB, 2),
                "seconds": round(time.perf_counter() - started, 1),
                "memory": memory,
            }
        )
    print_table(
        rows,
        [
            "backbone",
            "params_m",
            "activation_b_per_px",
            "baseline_mib_per_mp",
            "patchgd_mib_per_mp",
            "patchgd_streamed_mib_per_mp",
            "seconds",
        ],
    )
    path = write_json(f"backbones_{args.device}", {"machine": machine(args.device), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
