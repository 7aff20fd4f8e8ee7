"""A real crash: training is killed with SIGKILL mid-epoch and resumed in a new process.

Each run is its own Python process reading a small PNG dataset from disk. The interrupted run is
killed once its first time-based checkpoint exists: it is slowed down so that this checkpoint is
mid-epoch by construction, and then waits in the next step's progress callback to be killed, so
no later checkpoint can race the kill. A new process resumes with ``resume_from="auto"`` and must
end with weights bit-identical to an uninterrupted run's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from worker.patchgd.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]

CHILD = """
import sys, time
from pathlib import Path

import torch

torch.set_num_threads(1)
from worker.patchgd.config import PatchGDConfig
from worker.patchgd.data import DatasetIndex, Sample, make_loaders
from worker.patchgd.train import train

data, checkpoints, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
cfg = PatchGDConfig(
    num_classes=2, backbone="resnet18", image_size=32, patch_size=8, sampling=0.25, latent_dim=8,
    head_width=8, epochs=2, batch_size=2, warmup_epochs=1, seed=7,
    # 0.3 s: the slowed-down run (>= 0.25 s a step) writes its first one after step 1 or 2 of 4.
    checkpoint_every_minutes=0.3 / 60,
)
samples = [
    Sample(path, int(path.stem.split("_")[1]), path.parent.name) for path in sorted(data.glob("*/*.png"))
]
index = DatasetIndex(root=data, classes=("a", "b"), samples=tuple(samples), source="folders")
loaders = make_loaders(index, image_size=32, batch_size=2, cache_dir=data / ".cache", seed=cfg.seed)
losses = []

def on_progress(progress):
    if progress.phase != "train":
        return
    losses.append(progress.loss)
    if mode == "slow":
        if (checkpoints / "last.pt").exists():
            time.sleep(600)  # one checkpoint is written: wait here, mid-epoch, for the SIGKILL
        time.sleep(0.25)

result = train(
    cfg, loaders["train"], loaders["val"], device="cpu", on_progress=on_progress,
    checkpoint_dir=checkpoints if mode != "straight" else None,
    resume_from="auto" if mode == "resume" else None,
)
torch.save({"model": result.model.state_dict(), "losses": losses, "steps": result.steps}, out)
"""


def _dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 2)):
        (root / split).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / f"{i:02d}_{i % 2}.png")
    return root


def _child(
    tmp_path: Path, data: Path, checkpoints: Path, name: str, mode: str
) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = tmp_path / f"{name}.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(script), str(data), str(checkpoints), str(out), mode]
    return subprocess.Popen(args, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True), out


def _finish(process: subprocess.Popen, out: Path) -> dict:
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    return torch.load(out, weights_only=True)


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    checkpoints = tmp_path / "checkpoints"
    # The uninterrupted run (no checkpoints) goes alongside the one that will be killed.
    straight_run = _child(tmp_path, data, checkpoints, "straight", "straight")
    process, out = _child(tmp_path, data, checkpoints, "killed", "slow")
    deadline = time.monotonic() + 90
    while not (checkpoints / "last.pt").exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL and not out.exists()
    state = load_checkpoint(checkpoints / "last.pt")
    assert state["epoch"] == 0 and 0 < state["batch"] < 4, (state["epoch"], state["batch"])

    straight = _finish(*straight_run)
    assert straight["steps"] == 8
    resumed = _finish(*_child(tmp_path, data, checkpoints, "resumed", "resume"))
    assert resumed["steps"] == 8
    assert resumed["losses"] == straight["losses"][state["step"] :]
    assert straight["model"].keys() == resumed["model"].keys()
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
