"""PatchGD outer-step time against its ideal cost.

One full-sweep PatchGD outer step encodes every patch twice (no-grad fill pass, then the inner
iterations with gradient) and backpropagates once per patch. Its ideal cost is therefore one
no-grad forward over all patches plus one plain forward + backward over the same patches in the
same chunks of k, with nothing else (no latent map, head, loss per chunk or optimizer step).
The ratio step / ideal is the overhead of the PatchGD bookkeeping; images/s and patches/s are
reported too. Timings are medians over `--repeats` after one warm-up.

Next to it, the plain full-image baseline's training step on the same images (same backbone,
size, batch and precision): ``pixels_per_s`` for both, the throughput a user compares. A baseline
that does not fit the device is reported as ``"oom"``. ``--channels-last on|off|auto`` sets the
memory format of both (``auto``: on CUDA only).

    python -m bench.throughput                               # the CPU runs behind docs/benchmarks.md
    python -m bench.throughput --configs resnet18:512:128:4:1 --repeats 1 --name quick
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from bench.common import RESULTS, machine, print_table, write_json
from worker.patchgd.config import BaselineConfig, PatchGDConfig
from worker.patchgd.grid import TensorPatchSource
from worker.patchgd.models import build_baseline_model, build_patchgd_model
from worker.patchgd.train import autocast_context, baseline_step, build_optimizer, patchgd_step

CHANNELS_LAST = {"auto": "auto", "on": True, "off": False}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ideal_pass(model: Any, source: TensorPatchSource, cfg: PatchGDConfig, device: torch.device) -> float:
    """Seconds for one no-grad forward over all patches + one forward/backward over all patches."""
    channels_last = cfg.use_channels_last(device.type)
    chunks = torch.randperm(cfg.grid.num_patches).split(cfg.k)

    def batch_of(chunk: torch.Tensor) -> torch.Tensor:
        patches = source.patches(chunk).flatten(0, 1).to(device)
        return patches.contiguous(memory_format=torch.channels_last) if channels_last else patches

    _sync(device)
    started = time.perf_counter()
    with torch.no_grad(), autocast_context(cfg, device):
        for chunk in chunks:
            model.encode(batch_of(chunk))
    for chunk in chunks:
        with autocast_context(cfg, device):
            features = model.encode(batch_of(chunk))
        features.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    _sync(device)
    return time.perf_counter() - started


def baseline_seconds(
    cfg: PatchGDConfig, images: torch.Tensor, labels: torch.Tensor, device: torch.device, repeats: int
) -> float | str:
    """Median seconds of the full-image baseline's training step on the same images ("oom" if too big)."""
    base = BaselineConfig(
        num_classes=cfg.num_classes,
        backbone=cfg.backbone,
        image_size=cfg.image_size,
        batch_size=cfg.batch_size,
        precision=cfg.precision,
        channels_last=cfg.channels_last,
    )
    model = build_baseline_model(base, load_pretrained=False).to(device)
    if base.use_channels_last(device.type):
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = build_optimizer(model, base)
    times = []
    try:
        for attempt in range(repeats + 1):
            _sync(device)
            stats = baseline_step(model, optimizer, images, labels, base)
            _sync(device)
            if attempt:
                times.append(stats.seconds)
    except torch.OutOfMemoryError:
        return "oom"
    finally:
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return statistics.median(times)


def measure(
    spec: str,
    device: torch.device,
    repeats: int,
    precision: str,
    channels_last: str = "auto",
    with_baseline: bool = True,
) -> dict[str, Any]:
    """Time PatchGD steps, the ideal passes and the baseline for one `backbone:size:patch:k:batch` spec."""
    backbone, size, patch, k, batch = spec.split(":")
    cfg = PatchGDConfig(
        num_classes=4,
        backbone=backbone,
        image_size=int(size),
        patch_size=int(patch),
        patches_per_step=int(k),
        batch_size=int(batch),
        precision=precision,
        channels_last=CHANNELS_LAST[channels_last],
    )
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = build_patchgd_model(cfg, load_pretrained=False).to(device)
    if cfg.use_channels_last(device.type):
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = build_optimizer(model, cfg)
    images = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=generator).to(device)
    labels = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=generator)
    source = TensorPatchSource(images, cfg.grid)
    steps, ideals, encoded = [], [], 0
    for attempt in range(repeats + 1):
        _sync(device)
        stats = patchgd_step(model, optimizer, source, labels, cfg, generator=generator)
        _sync(device)
        ideal = ideal_pass(model, source, cfg, device)
        if attempt:  # the first round warms up allocator and kernels
            steps.append(stats.seconds)
            ideals.append(ideal)
            encoded = stats.num_patches_encoded
    step_s, ideal_s = statistics.median(steps), statistics.median(ideals)
    del model, optimizer
    base_s = baseline_seconds(cfg, images, labels, device, repeats) if with_baseline else None
    pixels = cfg.batch_size * cfg.image_size**2
    return {
        "config": spec,
        "backbone": backbone,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "k": cfg.k,
        "batch_size": cfg.batch_size,
        "grid": cfg.grid.n,
        "inner_iterations": cfg.num_inner_iterations,
        "precision": precision,
        "channels_last": cfg.use_channels_last(device.type),
        "step_s": round(step_s, 4),
        "ideal_s": round(ideal_s, 4),
        "ratio": round(step_s / ideal_s, 3),
        "images_per_s": round(cfg.batch_size / step_s, 3),
        "patches_per_s": round(encoded / step_s, 1),
        "pixels_per_s": round(pixels / step_s),
        "baseline_step_s": round(base_s, 4) if isinstance(base_s, float) else base_s,
        "baseline_pixels_per_s": round(pixels / base_s) if isinstance(base_s, float) else None,
        "step_s_all": [round(s, 4) for s in steps],
        "ideal_s_all": [round(s, 4) for s in ideals],
    }


def plot(payload: dict[str, Any], path: Any) -> None:
    """Bar chart: PatchGD step time next to the ideal, per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["rows"]
    labels = [
        f"{r['backbone']}\n{r['image_size']}px P{r['patch_size']} k{r['k']} B{r['batch_size']}" for r in rows
    ]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(5, 2.6 * len(rows)), 4.2))
    ax.bar(
        [x - 0.2 for x in xs],
        [r["ideal_s"] for r in rows],
        0.4,
        label="ideal (fwd + fwd/bwd)",
        color="tab:gray",
    )
    ax.bar(
        [x + 0.2 for x in xs], [r["step_s"] for r in rows], 0.4, label="PatchGD outer step", color="tab:blue"
    )
    for x, r in zip(xs, rows, strict=True):
        ax.annotate(f"{r['ratio']:.2f}x", (x + 0.2, r["step_s"]), ha="center", va="bottom", fontsize=9)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("seconds per outer step (median)")
    ax.set_title(f"PatchGD step vs ideal, {payload['machine']['device']}")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--configs",
        default="resnet18:512:128:4:2,resnet18:1024:128:16:1",
        help="comma-separated backbone:image_size:patch_size:k:batch",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    parser.add_argument(
        "--channels-last", dest="channels_last", default="auto", choices=sorted(CHANNELS_LAST)
    )
    parser.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the baseline step")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--name", default="throughput_cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    device = torch.device(args.device)
    rows = []
    for spec in args.configs.split(","):
        row = measure(spec, device, args.repeats, args.precision, args.channels_last, args.baseline)
        rows.append(row)
        print_table(
            [row],
            ["config", "step_s", "ideal_s", "ratio", "images_per_s", "pixels_per_s", "baseline_pixels_per_s"],
        )
    payload = {
        "benchmark": "throughput",
        "machine": machine(args.device),
        "settings": vars(args),
        "note": "Full-sweep outer steps (fill pass + ceil(n*n/k) inner iterations, one optimizer step). "
        "Ideal = one no-grad forward over all patches + one forward/backward over all patches in the same "
        "chunks of k (backbone only). patches_per_s counts both encodings of each patch.",
        "rows": rows,
    }
    json_path = write_json(args.name, payload)
    png_path = RESULTS / f"{args.name}.png"
    plot(payload, png_path)
    print(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
