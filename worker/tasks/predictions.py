"""Using a trained task's model: a prediction on one uploaded image (``predictions.run``) and an
evaluation on another dataset (``evaluations.run``), both on the light queue.

A prediction checks the upload like a dataset image (content sniffed, pixel count from the
header before any decode, corrupt data found, slides and pyramidal TIFFs by header), then reads
it the way training read its data: an ordinary image is decoded and resized once to the task's
``image_size`` (``load_resized``, what the training cache holds); a large, pyramidal or whole-slide
image is streamed, the PatchGD grid laid over the smallest pyramid level at least ``image_size``
on a side (or the task's own training level, ``pyramid_level``, when the upload has it), each
patch read from its region alone and resized (``FilePatchSource``). For PatchGD the
per-cell evidence (``patch_evidence``: occlusion of each cell's latent in Z by the image's mean
latent, head only) becomes a heatmap drawn over the thumbnail; a baseline model gets its
probabilities and the thumbnail only.

The engine is imported inside the task bodies, so importing this module stays torch-free.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from backend.config import Settings, get_settings
from backend.models import Evaluation, JobStatus, Prediction
from backend.queue import EVALUATIONS_RUN, PREDICTIONS_RUN
from backend.training import predictions as service
from worker.celery_app import celery_app

logger = logging.getLogger(__name__)

#: Longest side of the thumbnail (and so of the heatmap drawn over it).
THUMBNAIL_SIZE = 512
#: Smallest side of one heatmap cell in the PNG, so a small grid stays visible.
MIN_CELL_PIXELS = 8
#: The heatmap's colours: evidence for the predicted class, and against it.
FOR_COLOUR = (220, 38, 38)
AGAINST_COLOUR = (37, 99, 235)
#: Opacity of the cell with the strongest evidence (others scale with theirs).
MAX_ALPHA = 190
GENERIC_ERROR = "The prediction stopped on an unexpected error ({kind}); the details are in the worker's log."
#: Image kinds the engine reads, and the extension each is stored under.
CANONICAL_SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif", "BMP": ".bmp", "WEBP": ".webp"}
READABLE = "PNG, JPEG, TIFF (pyramidal included), BMP, WebP or a slide (.svs, .ndpi, .scn, .bif)"


class PredictionRefused(Exception):
    """The upload cannot be predicted on; the message says why, for the user."""


def _device():  # noqa: ANN202
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_task_model(task_dir: Path):  # noqa: ANN202
    """The task's trained model: the export folder when written, else the last checkpoint."""
    from backend.training.service import CHECKPOINTS_DIR, EXPORTS_DIR
    from worker.patchgd import load_model

    exports = task_dir / EXPORTS_DIR
    source = exports if (exports / "config.json").is_file() else task_dir / CHECKPOINTS_DIR
    return load_model(source, device=_device())


def identify(path: Path) -> Path:
    """The upload under the extension its content has (a PNG sent as ``scan.dat`` is read as a
    PNG); anything that is not an image the engine reads is refused, saying what it is."""
    from worker.datasets.engine import SLIDE_EXTENSIONS
    from worker.datasets.images import EXPECTED_KIND, sniff

    with open(path, "rb") as handle:
        head = handle.read(512)
    if not head:
        raise PredictionRefused("The file is empty.")
    kind = sniff(head)
    if kind not in CANONICAL_SUFFIX:
        raise PredictionRefused(f"The file is {kind}, not an image Tessera can read ({READABLE}).")
    suffix = path.suffix.lower()
    if EXPECTED_KIND.get(suffix) == kind and not (suffix in SLIDE_EXTENSIONS and kind != "TIFF"):
        return path
    target = path.with_suffix(CANONICAL_SUFFIX[kind])
    path.rename(target)
    return target


def _limits(settings: Settings):  # noqa: ANN202
    from worker.tasks.datasets import dataset_limits

    return dataclasses.replace(dataset_limits(settings), thumbnail_size=THUMBNAIL_SIZE)


def _training_level(cfg: Any, levels: int) -> int | None:
    """The pyramid level the task was trained on, if the upload has it (else None: the smallest
    level at least ``image_size``, the rule for tasks trained on level 0)."""
    level = getattr(cfg, "pyramid_level", None)
    return level if level and level < levels else None


def _model_input_streamed(
    path: Path, cfg: Any, limits: Any, levels: int = 1
) -> tuple[Any, dict[str, Any]]:
    """A streaming patch source over ``path`` for the PatchGD grid (what was read is described).
    Reads the task's training level when the upload has it."""
    from worker.patchgd.data import FilePatchSource

    level = _training_level(cfg, levels)
    source = FilePatchSource(path, cfg.grid, max_pixels=limits.max_slide_pixels, level=level)
    reader = source.open().reader
    return source, {"streamed": True, "level": reader.level, "level_size": list(reader.size)}


def _whole_image_streamed(path: Path, image_size: int, limits: Any, level: int | None = None):  # noqa: ANN202
    """A large image as one ``image_size``² uint8 array for the baseline, read tile by tile from
    pyramid level ``level``, else the smallest level at least that big (each tile resized like a
    PatchGD patch)."""
    import numpy as np

    from worker.patchgd.data import FilePatchSource
    from worker.patchgd.grid import PatchGrid

    n = next(k for k in range(1, image_size + 1) if image_size % k == 0 and image_size // k <= 512)
    grid = PatchGrid(image_size, image_size // n)
    source = FilePatchSource(path, grid, max_pixels=limits.max_slide_pixels, level=level)
    try:
        stream = source.open()
        p = grid.patch_size
        canvas = np.empty((image_size, image_size, 3), np.uint8)
        for index in range(grid.num_patches):
            row, col = grid.coords(index)
            canvas[row * p : (row + 1) * p, col * p : (col + 1) * p] = stream.patch_uint8(index)
        described = {"streamed": True, "level": stream.reader.level, "level_size": list(stream.reader.size)}
    finally:
        source.close()
    return canvas, described


def render_heatmap(evidence: Any, thumbnail: Path | None, target: Path) -> tuple[int, int]:
    """Draw the evidence grid ``[n, n]`` over the thumbnail (grey when there is none) as a PNG whose
    sides are whole multiples of ``n`` (each cell a uniform block); returns its size."""
    import numpy as np
    from PIL import Image

    values = np.asarray(evidence, dtype=np.float64)
    n = values.shape[0]
    if thumbnail is not None:
        with Image.open(thumbnail) as image:
            background = image.convert("RGB")
    else:
        background = Image.new("RGB", (THUMBNAIL_SIZE, THUMBNAIL_SIZE), (128, 128, 128))
    cell_w = max(MIN_CELL_PIXELS, round(background.width / n))
    cell_h = max(MIN_CELL_PIXELS, round(background.height / n))
    size = (cell_w * n, cell_h * n)
    base = background.resize(size, Image.Resampling.BILINEAR).convert("RGBA")
    strongest = float(np.abs(values).max())
    cells = np.zeros((n, n, 4), np.uint8)
    if strongest > 0:
        cells[values > 0, :3] = FOR_COLOUR
        cells[values <= 0, :3] = AGAINST_COLOUR
        cells[..., 3] = np.round(MAX_ALPHA * np.abs(values) / strongest).astype(np.uint8)
    overlay = Image.fromarray(cells, mode="RGBA").resize(size, Image.Resampling.NEAREST)
    Image.alpha_composite(base, overlay).convert("RGB").save(target, "PNG")
    return size


def predict_file(settings: Settings, spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Check, read and predict on the prediction's image; write its thumbnail and heatmap.
    Returns ``(result, files)``; raises ``PredictionRefused`` or ``EngineError`` for the user."""
    import torch
    from PIL import Image

    from worker.datasets.images import ImageProblem, check_image
    from worker.patchgd import patch_evidence, predict
    from worker.patchgd.data import load_resized, needs_streaming
    from worker.patchgd.grid import normalize_uint8
    from worker.patchgd.models import PatchGDModel

    started = time.perf_counter()
    folder = Path(spec["folder"])
    path = identify(Path(spec["image"]))
    limits = _limits(settings)
    scratch = folder / "thumbnail.source.jpg"
    try:
        info = check_image(path, spec["filename"] or path.name, limits, thumbnail=scratch)
    except ImageProblem as exc:
        item = exc.problem
        raise PredictionRefused(f"{item.message[:1].upper()}{item.message[1:]}. {item.hint}") from exc
    files = {"image": str(path.relative_to(settings.data_dir))}
    thumbnail: Path | None = None
    if scratch.is_file():
        thumbnail = folder / "thumbnail.png"
        with Image.open(scratch) as image:
            image.convert("RGB").save(thumbnail, "PNG")
        scratch.unlink()
        files["thumbnail"] = str(thumbnail.relative_to(settings.data_dir))

    model, cfg = _load_task_model(Path(spec["task_dir"]))
    streamed = needs_streaming(path)
    described: dict[str, Any] = {"streamed": False, "level": 0, "level_size": [info.width, info.height]}
    evidence = None
    if isinstance(model, PatchGDModel):
        if streamed:
            source, described = _model_input_streamed(path, cfg, limits, len(info.levels))
        else:
            source = normalize_uint8(
                load_resized(path, cfg.image_size, max_pixels=limits.max_pixels)
            ).unsqueeze(0)
        try:
            explained = patch_evidence(model, source)
        finally:
            if hasattr(source, "close"):
                source.close()
        probabilities = explained.probabilities
        evidence = explained.evidence
    else:
        if streamed:
            pixels, described = _whole_image_streamed(
                path, cfg.image_size, limits, _training_level(cfg, len(info.levels))
            )
        else:
            pixels = load_resized(path, cfg.image_size, max_pixels=limits.max_pixels)
        probabilities = predict(model, normalize_uint8(pixels).unsqueeze(0))[0]

    classes = list(spec["classes"])
    if len(classes) != probabilities.shape[0]:
        classes = [f"class {i}" for i in range(probabilities.shape[0])]
    index = int(torch.argmax(probabilities))
    result: dict[str, Any] = {
        "algorithm": spec["algorithm"],
        "classes": classes,
        "probabilities": {name: float(p) for name, p in zip(classes, probabilities.tolist(), strict=True)},
        "predicted": classes[index],
        "predicted_index": index,
        "input": {
            "format": info.format,
            "width": info.width,
            "height": info.height,
            "levels": [list(level) for level in info.levels],
            "image_size": cfg.image_size,
            **described,
        },
        "evidence": None,
    }
    if evidence is not None:
        heatmap = folder / "heatmap.png"
        width, height = render_heatmap(evidence.numpy(), thumbnail, heatmap)
        files["heatmap"] = str(heatmap.relative_to(settings.data_dir))
        n = evidence.shape[0]
        top = int(torch.argmax(evidence))
        result["evidence"] = {
            "method": "occlusion of each cell's latent in Z (head only)",
            "baseline": explained.baseline,
            "target": classes[index],
            "grid": n,
            "patch_size": cfg.patch_size,
            "cells": [[round(float(v), 6) for v in row] for row in evidence.tolist()],
            "max_abs": float(evidence.abs().max()),
            "top_cell": [top // n, top % n],
            "heatmap_size": [width, height],
        }
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result, files


def run_prediction(settings: Settings, prediction_id: int) -> str:
    """Claim prediction ``prediction_id`` and run it to an outcome; returns what happened."""
    from worker.patchgd.errors import EngineError

    if not service.claim(settings, Prediction, prediction_id):
        return "skipped"
    spec = service.prediction_spec(settings, prediction_id)
    if spec is None:
        return "gone"
    folder = Path(spec["folder"])
    try:
        result, files = predict_file(settings, spec)
    except (PredictionRefused, EngineError) as exc:
        logger.info("prediction %s failed: %s", prediction_id, exc)
        done = service.finish(settings, Prediction, prediction_id, JobStatus.FAILED, error=str(exc))
    except Exception as exc:
        logger.exception("prediction %s failed unexpectedly", prediction_id)
        error = GENERIC_ERROR.format(kind=type(exc).__name__)
        done = service.finish(settings, Prediction, prediction_id, JobStatus.FAILED, error=error)
    else:
        done = service.finish(
            settings, Prediction, prediction_id, JobStatus.SUCCEEDED, result=result, files=files
        )
        if done:
            return "succeeded"
    if not done:  # the task (and this row) was deleted meanwhile: leave nothing behind
        shutil.rmtree(folder, ignore_errors=True)
        return "gone"
    return "failed"


@celery_app.task(name=PREDICTIONS_RUN)
def run_prediction_task(prediction_id: int) -> str:
    """Predict with a finished task's model on an uploaded image (the row says which)."""
    return run_prediction(get_settings(), int(prediction_id))


def evaluate_dataset(spec: dict[str, Any]) -> dict[str, Any]:
    """The task's model on the dataset's held-out split (``test``, else ``val``, else all of it),
    its labels mapped onto the model's class order by name."""
    from worker.patchgd import evaluate, make_loaders
    from worker.patchgd.data import DatasetIndex, Sample
    from worker.patchgd.errors import DatasetError
    from worker.tasks.training import dataset_index_from_report

    report_path = Path(spec["report_path"])
    if not report_path.is_file():
        raise DatasetError("the dataset's validation report is missing; upload the dataset again")
    index = dataset_index_from_report(Path(spec["dataset_dir"]), json.loads(report_path.read_text("utf-8")))
    ours = list(spec["classes"])
    if sorted(ours) != sorted(index.classes):
        raise DatasetError(
            f"the dataset's classes ({', '.join(index.classes)}) are not the model's ({', '.join(ours)})"
        )
    to_ours = {i: ours.index(name) for i, name in enumerate(index.classes)}
    splits = {s.split for s in index.samples}
    split = "test" if "test" in splits else "val" if "val" in splits else "all"
    chosen = [
        Sample(path=s.path, label=to_ours[s.label], split="test")
        for s in index.samples
        if split == "all" or s.split == split
    ]
    held_out = DatasetIndex(root=index.root, classes=tuple(ours), samples=tuple(chosen), source=index.source)
    model, cfg = _load_task_model(Path(spec["task_dir"]))
    work = Path(spec["work_dir"])
    try:
        loaders = make_loaders(
            held_out,
            image_size=cfg.image_size,
            batch_size=cfg.batch_size,
            cache_dir=work / "cache",
            num_workers=0,
        )
        metrics = evaluate(model, loaders["test"], cfg, _device()) or {}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {**metrics, "split": split, "classes": ours}


def run_evaluation(settings: Settings, evaluation_id: int) -> str:
    """Claim evaluation ``evaluation_id`` and run it to an outcome; returns what happened."""
    from worker.patchgd.errors import EngineError

    if not service.claim(settings, Evaluation, evaluation_id):
        return "skipped"
    spec = service.evaluation_spec(settings, evaluation_id)
    if spec is None:
        service.finish(
            settings,
            Evaluation,
            evaluation_id,
            JobStatus.FAILED,
            error="The dataset was deleted before it ran.",
        )
        return "failed"
    try:
        result = evaluate_dataset(spec)
    except EngineError as exc:
        logger.info("evaluation %s failed: %s", evaluation_id, exc)
        service.finish(settings, Evaluation, evaluation_id, JobStatus.FAILED, error=str(exc))
        return "failed"
    except Exception as exc:
        logger.exception("evaluation %s failed unexpectedly", evaluation_id)
        error = f"The evaluation stopped on an unexpected error ({type(exc).__name__}); see the worker's log."
        service.finish(settings, Evaluation, evaluation_id, JobStatus.FAILED, error=error)
        return "failed"
    service.finish(settings, Evaluation, evaluation_id, JobStatus.SUCCEEDED, result=result)
    return "succeeded"


@celery_app.task(name=EVALUATIONS_RUN)
def run_evaluation_task(evaluation_id: int) -> str:
    """Evaluate a finished task's model on another dataset (the row says which)."""
    return run_evaluation(get_settings(), int(evaluation_id))
