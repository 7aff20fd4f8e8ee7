"""Export trained models (safetensors + JSON config, TorchScript, ONNX) and verify each export.

Every exported model takes normalised float32 images ``[B, C, S, S]`` at the training image size
(see ``grid.normalize_uint8``) and returns logits ``[B, classes]``. A PatchGD export runs the
full-image patch-decomposed forward: every patch through the backbone in one batch, then the
head (the same row-major layout as training). ``verify_export`` reloads a file the way a user
would and checks it predicts what the in-memory model predicts.
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoint import load_checkpoint
from .config import BaselineConfig, PatchGDConfig, config_from_dict
from .errors import CheckpointError, ExportError
from .models import build_baseline_model, build_patchgd_model
from .train import CHECKPOINT_NAME

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TORCHSCRIPT_FILE = "model.torchscript.pt"
ONNX_FILE = "model.onnx"
FORMATS = ("safetensors", "torchscript", "onnx")
#: Weights up to this size are stored inside the ONNX file (protobuf refuses messages over 2 GiB).
ONNX_INLINE_LIMIT_BYTES = 1_800_000_000


def _example_input(cfg: PatchGDConfig | BaselineConfig, batch: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=generator)


def _cpu_eval_copy(model: nn.Module) -> nn.Module:
    """A CPU, eval-mode, contiguous float32 copy (exports are device-neutral; the original is untouched)."""
    return copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).float().eval()


def export_safetensors(model: nn.Module, cfg: PatchGDConfig | BaselineConfig, out_dir: str | Path) -> Path:
    """Write ``model.safetensors`` (weights) and ``config.json`` (algorithm + hyperparameters).

    The config copy drops ``pretrained_weights``: the exported weights already contain them and
    the original file need not exist where the export is loaded.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = _cpu_eval_copy(model)
    # safetensors refuses tensors that share memory or are views: store independent copies.
    state = {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"algorithm": cfg.algorithm})
    config = {**cfg.to_dict(), "pretrained_weights": None}
    (out / CONFIG_FILE).write_text(json.dumps({"algorithm": cfg.algorithm, "config": config}, indent=2))
    return out / WEIGHTS_FILE


def load_exported(out_dir: str | Path) -> tuple[nn.Module, PatchGDConfig | BaselineConfig]:
    """Rebuild a model from ``export_safetensors`` output: ``(model in eval mode, config)``."""
    out = Path(out_dir)
    try:
        meta = json.loads((out / CONFIG_FILE).read_text())
        cfg = config_from_dict(meta["algorithm"], meta["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{CONFIG_FILE} in {out.name} is missing or invalid: {exc}") from exc
    model = _build(cfg)
    try:
        model.load_state_dict(load_file(str(out / WEIGHTS_FILE)))
    except (OSError, RuntimeError) as exc:
        raise ExportError(f"{WEIGHTS_FILE} in {out.name} does not match its config: {exc}") from exc
    return model.eval(), cfg


def _build(cfg: PatchGDConfig | BaselineConfig) -> nn.Module:
    if isinstance(cfg, PatchGDConfig):
        return build_patchgd_model(cfg, load_pretrained=False)
    return build_baseline_model(cfg, load_pretrained=False)


def load_model(
    path: str | Path, *, device: torch.device | str = "cpu"
) -> tuple[nn.Module, PatchGDConfig | BaselineConfig]:
    """Rebuild a trained model, PatchGD or baseline, from whatever a run left behind.

    ``path`` is a training checkpoint file (``last.pt``), a checkpoint folder holding ``last.pt``,
    or an export folder (``config.json`` + ``model.safetensors``, from ``export_all``). Returns
    ``(model, config)``: the model in eval mode on ``device``, ready for ``predict``, and the
    config it was trained with. Nothing in the files runs code (safetensors or the weights-only
    unpickler). A path that is none of these raises ``CheckpointError`` or ``ExportError``.
    """
    source = Path(path)
    if source.is_dir():
        if (source / CONFIG_FILE).is_file():
            model, cfg = load_exported(source)
            return model.to(device).eval(), cfg
        if not (source / CHECKPOINT_NAME).is_file():
            raise ExportError(
                f"{source.name} is neither an export folder ({CONFIG_FILE} + {WEIGHTS_FILE}) "
                f"nor a checkpoint folder ({CHECKPOINT_NAME})"
            )
        source = source / CHECKPOINT_NAME
    state = load_checkpoint(source)
    try:
        cfg = config_from_dict(state["algorithm"], state["config"])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {source.name} has no usable config: {exc}") from exc
    model = _build(cfg)
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {source.name}: weights do not match its config: {exc}") from exc
    return model.to(device).eval(), cfg


@contextlib.contextmanager
def _torchscript_deprecation_silenced() -> Iterator[None]:
    """Hide only torch's "torch.jit.* is deprecated" FutureWarning (see ``export_torchscript``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*torch\.jit\.\w+.* is deprecated", category=FutureWarning
        )
        yield


def export_torchscript(model: nn.Module, cfg: PatchGDConfig | BaselineConfig, out_dir: str | Path) -> Path:
    """Write a traced TorchScript module (fixed image size), loadable with ``torch.jit.load``.

    Upstream marks ``torch.jit.trace`` deprecated in favour of ``torch.export``, but TorchScript is
    still what LibTorch (C++) deployments load, so we keep offering it and silence only that notice.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = _cpu_eval_copy(model)
    with _torchscript_deprecation_silenced(), torch.no_grad():
        traced = torch.jit.trace(model, _example_input(cfg))
    path = out / TORCHSCRIPT_FILE
    traced.save(str(path))
    return path


def export_onnx(model: nn.Module, cfg: PatchGDConfig | BaselineConfig, out_dir: str | Path) -> Path:
    """Write an ONNX model (fixed image size, dynamic batch) with the ``torch.export`` exporter.

    The ``dynamo=True`` exporter is the maintained one and works offline; its input is named
    ``images`` and its output ``logits``. The weights are stored inside the one ``.onnx`` file
    (a download is a single file), unless they pass protobuf's 2 GiB limit: then they go to
    ``model.onnx.data`` beside it, which must travel with it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = _cpu_eval_copy(model)
    path = out / ONNX_FILE
    example = _example_input(cfg, batch=2)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    try:
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            external_data=weight_bytes > ONNX_INLINE_LIMIT_BYTES,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=1024)}},
            verbose=False,
        )
    except Exception as exc:  # the exporter raises many unrelated types; the user needs one message
        raise ExportError(f"ONNX export failed: {exc}") from exc
    return path


def _predictions(run: Any, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(torch.as_tensor(run(images)).float(), dim=1)


def verify_export(
    model: nn.Module,
    cfg: PatchGDConfig | BaselineConfig,
    out_dir: str | Path,
    *,
    formats: tuple[str, ...] = FORMATS,
    images: torch.Tensor | None = None,
    atol: float = 1e-4,
) -> dict[str, float]:
    """Reload each exported format and compare its probabilities with the in-memory model's.

    Returns the largest absolute probability difference per format; raises ``ExportError`` when
    a file is missing or any difference exceeds ``atol``.
    """
    out = Path(out_dir)
    reference_model = _cpu_eval_copy(model)
    images = images if images is not None else _example_input(cfg, batch=2, seed=1)
    expected = _predictions(reference_model, images)
    runners: dict[str, Any] = {}
    for fmt in formats:
        if fmt == "safetensors":
            runners[fmt] = load_exported(out)[0]
        elif fmt == "torchscript":
            with _torchscript_deprecation_silenced():
                runners[fmt] = torch.jit.load(str(out / TORCHSCRIPT_FILE), map_location="cpu")
        elif fmt == "onnx":
            import onnxruntime

            session = onnxruntime.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
            runners[fmt] = lambda x, s=session: s.run(["logits"], {"images": x.numpy()})[0]
        else:
            raise ExportError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    differences: dict[str, float] = {}
    for fmt, run in runners.items():
        got = _predictions(run, images)
        if got.shape != expected.shape:
            raise ExportError(
                f"{fmt} export returns shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
            )
        differences[fmt] = float((got - expected).abs().max())
        if differences[fmt] > atol:
            raise ExportError(
                f"{fmt} export differs from the trained model by {differences[fmt]:.2e} (> {atol})"
            )
    return differences


def export_all(
    model: nn.Module,
    cfg: PatchGDConfig | BaselineConfig,
    out_dir: str | Path,
    *,
    formats: tuple[str, ...] = FORMATS,
) -> dict[str, Any]:
    """Write the requested formats into ``out_dir`` and verify them; returns paths and differences."""
    writers = {"safetensors": export_safetensors, "torchscript": export_torchscript, "onnx": export_onnx}
    unknown = [fmt for fmt in formats if fmt not in writers]
    if unknown:
        raise ExportError(f"unknown export format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    paths = {fmt: str(writers[fmt](model, cfg, out_dir)) for fmt in formats}
    return {"paths": paths, "max_abs_difference": verify_export(model, cfg, out_dir, formats=formats)}
