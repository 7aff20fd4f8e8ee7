"""Markdown tables from benchmark JSON (what docs/benchmarks.md quotes).

python -m bench.report bench/results/memory_cpu.json bench/results/throughput_cpu.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

GIB = 2**30


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def memory_table(payload: dict[str, Any]) -> str:
    """One row per measurement: predicted vs measured peak, status."""
    lines = [
        "| backbone | algorithm | input | image | P / k | predicted GiB | measured GiB | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        source = {"tensor": "in memory", "stream": "streamed TIFF"}[r["source"]]
        pk = f"{r['patch_size']} / {r['k']}" if "patch_size" in r else "-"
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason') or ''}"
        lines.append(
            f"| {r['backbone']} | {r['algorithm']} | {source} | {r['image_size']}² | {pk} | "
            f"{_gib(r.get('predicted_bytes'))} | {_gib(r.get('measured_bytes'))} | {status} |"
        )
    return "\n".join(lines)


def throughput_table(payload: dict[str, Any]) -> str:
    """One row per configuration: step time, ideal time, ratio, rates."""
    lines = [
        "| backbone | image | P | k | batch | inner its | step s | ideal s | ratio | images/s | patches/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        lines.append(
            f"| {r['backbone']} | {r['image_size']}² | {r['patch_size']} | {r['k']} | {r['batch_size']} | "
            f"{r['inner_iterations']} | {r['step_s']:.2f} | {r['ideal_s']:.2f} | {r['ratio']:.2f} | "
            f"{r['images_per_s']:.3f} | {r['patches_per_s']:.1f} |"
        )
    return "\n".join(lines)


def planner_table(payload: dict[str, Any]) -> str:
    """One row per planner scenario: requested, budget, chosen, predicted vs measured, the error
    of the prediction and the whole process's measured peak."""
    lines = [
        "| algorithm | backbone | requested | budget GiB | chosen | predicted GiB | measured GiB "
        "| error | whole process GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
        return "-" if value is None else f"{value:{spec}}{suffix}"

    for r in payload["rows"]:
        error = r.get("error_pct")
        lines.append(
            f"| {r['algorithm']} | {r['backbone']} | {r['requested']} | {r['budget_gib']} | {r['chosen']} | "
            f"{fmt(r['predicted_gib'])} | {fmt(r['measured_gib'])} | {fmt(error, '+.1f', '%')} | "
            f"{fmt(r.get('process_gib'))} |"
        )
    return "\n".join(lines)


def runtime_table(payload: dict[str, Any]) -> str:
    """Whole-process resident memory after each stage of starting a worker."""
    lines = ["| stage | process RSS GiB (median) | range GiB |", "|---|---|---|"]
    for r in payload["rows"]:
        lines.append(f"| {r['stage']} | {r['rss_gib']} | {r['min_gib']} to {r['max_gib']} |")
    return "\n".join(lines)


TABLES = {
    "memory": memory_table,
    "throughput": throughput_table,
    "planner": planner_table,
    "runtime": runtime_table,
}


def main() -> None:
    """Print a table for every JSON file given on the command line (or merge memory runs into a plot)."""
    args = sys.argv[1:]
    if args[:1] == ["--plot"]:
        from bench.memory import plot

        payloads = [json.loads(Path(name).read_text()) for name in args[2:]]
        # The first file wins where runs overlap, so each curve comes from one calibration.
        rows: dict[tuple, dict[str, Any]] = {}
        for payload in payloads:
            for row in payload["rows"]:
                key = (row["backbone"], row["algorithm"], row["source"], row["image_size"])
                if row["status"] != "skipped" and key not in rows:
                    rows[key] = row
        merged = {**payloads[0], "rows": list(rows.values())}
        plot(merged, Path(args[1]))
        print(f"wrote {args[1]}")
        return
    for name in args:
        payload = json.loads(Path(name).read_text())
        print(f"### {name}\n")
        print(TABLES[payload["benchmark"]](payload))
        print()


if __name__ == "__main__":
    main()
