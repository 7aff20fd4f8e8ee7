"""Peak training memory vs image size: PatchGD (in-memory and streaming input) and the baseline.

PatchGD is measured over a PARTIAL outer step: the fill pass over every patch plus the first
`--inner` inner iterations (default 2). From the second inner iteration on, gradients and Adam
state are alive through forward and backward and every later iteration allocates the same
tensors again, so this is the step's steady-state peak at a fraction of the time. The baseline
is one full-image training step. Every measurement runs in a child process (peak RSS over the
child's baseline on CPU; allocator peak on CUDA) next to the analytic model's prediction.
Baseline sizes whose prediction exceeds `--guard-gib` are not run (the machine would start
swapping or kill processes) and are recorded as "does not fit".

    python -m bench.memory                       # the CPU sweep behind docs/benchmarks.md
    python -m bench.memory --backbones resnet18 --sizes 512,1024 --stream-sizes 1024 --name quick
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.common import RESULTS, gib, machine, print_table, write_json
from worker.patchgd.config import BaselineConfig, PatchGDConfig
from worker.patchgd.memory import (
    GIB,
    baseline_trial,
    calibrate_backbone,
    estimate_baseline_bytes,
    estimate_patchgd_bytes,
    measure_peak,
    patchgd_trial,
)
from worker.patchgd.testing import write_pyramidal_tiff


def _parse_sizes(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def _parse_caps(items: list[str]) -> dict[str, int]:
    caps = {}
    for item in items:
        name, _, size = item.partition("=")
        caps[name] = int(size)
    return caps


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the sweep described by the command-line arguments; returns the JSON payload."""
    # The generated slides can be gigabytes on disk: they live only as long as the sweep.
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as slides:
        return _sweep(args, Path(slides))


def _sweep(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    device = args.device
    precision = args.precision
    caps = _parse_caps(args.cap)
    rows: list[dict[str, Any]] = []
    calibration: dict[str, dict[str, float]] = {}
    for backbone in args.backbones.split(","):
        cap = caps.get(backbone)
        probe = PatchGDConfig(
            num_classes=2, backbone=backbone, precision=precision, channels_last=args.channels_last
        )
        dev_type = "cuda" if device.startswith("cuda") else "cpu"
        cal = calibrate_backbone(
            backbone,
            device=device,
            bf16=probe.use_bf16(dev_type),
            channels_last=probe.use_channels_last(dev_type),
            patch_size=args.patch,
        )
        calibration[backbone] = dataclasses.asdict(cal)
        print(
            f"[{backbone}] calibrated: {cal.bytes_per_pixel:.0f} bytes per input pixel (forward + backward), "
            f"fixed overhead {cal.overhead_bytes / 2**20:.0f} MiB"
        )
        model_terms = {"bytes_per_pixel": cal.bytes_per_pixel, "overhead_bytes": cal.overhead_bytes}
        sweeps = [("patchgd", "tensor", s) for s in _parse_sizes(args.sizes)]
        sweeps += [("patchgd", "stream", s) for s in _parse_sizes(args.stream_sizes)]
        sweeps += [("baseline", "tensor", s) for s in _parse_sizes(args.baseline_sizes)]
        for algorithm, source, size in sweeps:
            row: dict[str, Any] = {
                "backbone": backbone,
                "algorithm": algorithm,
                "source": source,
                "image_size": size,
                "batch_size": 1,
                "precision": precision,
            }
            # The cap bounds CPU time of PatchGD runs; baseline runs are bounded by the guard below.
            if cap is not None and size > cap and algorithm == "patchgd":
                row.update(status="skipped", reason=f"above --cap {backbone}={cap} (CPU time)")
                rows.append(row)
                continue
            if algorithm == "patchgd":
                cfg = PatchGDConfig(
                    num_classes=2,
                    backbone=backbone,
                    image_size=size,
                    patch_size=args.patch,
                    patches_per_step=min(args.k, (size // args.patch) ** 2),
                    batch_size=1,
                    precision=precision,
                    channels_last=args.channels_last,
                )
                row.update(patch_size=args.patch, k=cfg.k, grid=cfg.grid.n, inner_iterations_run=args.inner)
                estimate = estimate_patchgd_bytes(cfg, **model_terms, streaming=source == "stream")
                tiff = None
                if source == "stream":
                    tiff = tmp / f"slide_{size}.tif"
                    if not tiff.exists():
                        write_pyramidal_tiff(tiff, size, levels=1)
                measured = measure_peak(
                    patchgd_trial,
                    cfg.to_dict(),
                    device,
                    args.inner,
                    str(tiff) if tiff else None,
                    device=device,
                    isolate=True,
                    timeout_s=args.timeout,
                )
            else:
                cfg_b = BaselineConfig(
                    num_classes=2,
                    backbone=backbone,
                    image_size=size,
                    batch_size=1,
                    precision=precision,
                    channels_last=args.channels_last,
                )
                estimate = estimate_baseline_bytes(cfg_b, **model_terms)
                if estimate.total_bytes > args.guard_gib * GIB:
                    row.update(
                        predicted_bytes=estimate.total_bytes,
                        status="does_not_fit",
                        reason=f"predicted {estimate.total_gib:.1f} GiB > guard {args.guard_gib} GiB: "
                        "not run",
                    )
                    rows.append(row)
                    print_table([row], ["backbone", "algorithm", "image_size", "status", "reason"])
                    continue
                measured = measure_peak(
                    baseline_trial,
                    cfg_b.to_dict(),
                    device,
                    device=device,
                    isolate=True,
                    timeout_s=args.timeout,
                    limit_bytes=int(args.guard_gib * GIB),
                )
            row.update(
                predicted_bytes=estimate.total_bytes,
                predicted_terms=estimate.terms,
                measured_bytes=measured.peak_bytes,
                status=measured.status
                if measured.fits
                else ("does_not_fit" if measured.status == "out_of_memory" else measured.status),
                reason=measured.reason,
                wall_s=round(measured.wall_s, 1),
            )
            rows.append(row)
            print_table(
                [
                    {
                        **row,
                        "predicted_gib": gib(row["predicted_bytes"]),
                        "measured_gib": gib(row["measured_bytes"]),
                    }
                ],
                [
                    "backbone",
                    "algorithm",
                    "source",
                    "image_size",
                    "predicted_gib",
                    "measured_gib",
                    "status",
                    "wall_s",
                ],
            )
    return {
        "benchmark": "memory",
        "machine": machine(device),
        "settings": vars(args),
        "note": "PatchGD rows: fill pass + first inner iteration(s) of one outer step, batch 1. "
        "Baseline rows: one full-image training step, batch 1. Bytes are peak over the measuring "
        "process's baseline (RSS on CPU, CUDA allocator peak on GPU).",
        "calibration": calibration,
        "rows": rows,
    }


def plot(payload: dict[str, Any], path: Path) -> None:
    """Peak memory vs image size, one panel per backbone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["rows"]
    backbones = sorted({r["backbone"] for r in rows})
    fig, axes = plt.subplots(1, len(backbones), figsize=(6 * len(backbones), 4.5), squeeze=False)
    styles = {
        ("patchgd", "tensor"): ("PatchGD (image in memory)", "tab:blue"),
        ("patchgd", "stream"): ("PatchGD (streamed from TIFF)", "tab:green"),
        ("baseline", "tensor"): ("Full-image baseline", "tab:red"),
    }
    for ax, backbone in zip(axes[0], backbones, strict=True):
        for (algorithm, source), (label, colour) in styles.items():
            series = sorted(
                (
                    r
                    for r in rows
                    if r["backbone"] == backbone and r["algorithm"] == algorithm and r["source"] == source
                ),
                key=lambda r: r["image_size"],
            )
            done = [r for r in series if r.get("measured_bytes") is not None]
            if done:
                ax.plot(
                    [r["image_size"] for r in done],
                    [r["measured_bytes"] / GIB for r in done],
                    "o-",
                    color=colour,
                    label=f"{label}, measured",
                )
            pred = [r for r in series if r.get("predicted_bytes") is not None]
            if pred:
                ax.plot(
                    [r["image_size"] for r in pred],
                    [r["predicted_bytes"] / GIB for r in pred],
                    "--",
                    color=colour,
                    alpha=0.5,
                    label=f"{label}, predicted",
                )
            for r in series:
                if r.get("status") == "does_not_fit":
                    ax.annotate(
                        "does not fit",
                        (r["image_size"], r.get("predicted_bytes", GIB) / GIB),
                        color=colour,
                        fontsize=8,
                        ha="center",
                    )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("image side (px)")
        ax.set_ylabel("peak training memory (GiB)")
        ax.set_title(f"{backbone}, batch 1, {payload['machine']['device']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbones", default="mobilenet_v3_small,resnet50")
    parser.add_argument("--sizes", default="512,1024,2048,4096,8192", help="PatchGD, images in memory")
    parser.add_argument("--stream-sizes", default="2048,4096,8192,16384", help="PatchGD, streamed from TIFF")
    parser.add_argument("--baseline-sizes", default="512,1024,2048,4096,8192")
    parser.add_argument("--patch", type=int, default=256)
    parser.add_argument("--k", type=int, default=8, help="patches re-encoded with gradient per inner step")
    parser.add_argument("--inner", type=int, default=2, help="inner iterations measured after the fill pass")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--channels-last", dest="channels_last", default="auto")
    parser.add_argument(
        "--guard-gib", type=float, default=20.0, help="baseline runs predicted above this are skipped"
    )
    parser.add_argument(
        "--cap",
        action="append",
        default=[],
        metavar="BACKBONE=SIZE",
        help="largest image side to run for a backbone (CPU time), e.g. resnet50=4096",
    )
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--name", default="memory_cpu")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    args.channels_last = {"true": True, "false": False}.get(str(args.channels_last).lower(), "auto")
    payload = run(args)
    json_path = write_json(args.name, payload)
    png_path = RESULTS / f"{args.name}.png"
    plot(payload, png_path)
    print(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
