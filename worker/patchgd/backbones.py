"""Backbone weights from users: inspected without running them, normalised, checked; catalog facts.

An uploaded weights file is judged before anything in it is unpickled (:func:`sniff_weights`):
safetensors is read as data; a ``torch.save`` zip or a raw pickle has its pickle opcodes read
(never executed) and is refused when it names a model class (a whole pickled module) or something
that runs code; a TorchScript archive or a program is refused by its layout. What passes is read
with ``torch.load(weights_only=True)``, which refuses every other global a second time.

:func:`check_weights` then maps the file's keys onto the architecture's trunk the way a user
expects: common wrapper prefixes (``module.``, ``model.``, ``backbone.``) are stripped, and the
ImageNet classifier head, whatever its class count, is dropped because PatchGD puts its own head on
the pooled features. Every remaining key and shape must match (the first mismatches are listed),
the result is written as a plain safetensors trunk state dict that :func:`models.load_weights`
loads strictly, and one forward pass on CPU proves it runs.

:func:`describe_architecture` reports what the catalog page shows for a built-in backbone: its
parameter count, the training memory per megapixel for PatchGD and the full-image baseline (from
the calibrated memory model), and whether torchvision's ImageNet weights are in the local torch
cache (they are never downloaded).
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision.models as tvm

from .catalog import BACKBONE_CATALOG
from .errors import WeightsError
from .models import BACKBONES, _build_trunk, build_backbone

__all__ = [
    "WEIGHTS_SUFFIXES",
    "WeightsCheck",
    "WeightsMismatch",
    "WeightsRefused",
    "check_weights",
    "describe_architecture",
    "imagenet_weights",
    "sniff_weights",
]

#: File name endings accepted for uploaded weights.
WEIGHTS_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
#: Prefixes that training wrappers put in front of every key (DataParallel, Lightning, timm...).
WRAPPER_PREFIXES = ("module.", "model.", "backbone.")
#: Mismatches listed in full; the rest are counted.
MAX_LISTED_MISMATCHES = 20
#: Side of the random image of the forward-pass check (every catalog trunk reduces it to >= 2x2).
CHECK_IMAGE_SIZE = 64

_SAVE_STATE_DICT = (
    "Save the weights as a state dict instead: torch.save(model.state_dict(), 'weights.pt'), "
    "or safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')."
)
# A first look at the globals a pickle names: outside these it would build other objects or run
# code. Deliberately broad (torch.* includes the tensor and storage rebuilders of every version);
# torch.load(weights_only=True) then enforces torch's own exact allow-list.
_DATA_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "numpy.", "_codecs.encode")
# Parts of torch that load or run code, refused even though they are under torch.
_CODE_TORCH_PREFIXES = (
    "torch.hub.",
    "torch.jit.",
    "torch.package.",
    "torch.utils.",
    "torch.ops.",
    "torch.load",
)
_DATA_BUILTINS = frozenset({"builtins.set", "builtins.frozenset", "builtins.slice", "builtins.complex"})
_STRING_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
)
_MAX_PICKLES = 8  # a legacy torch.save file is a few pickles in a row, then raw storage bytes


class WeightsRefused(WeightsError):
    """The file is not plain weights (a pickled model, TorchScript, code, or no state dict at all)."""


class WeightsMismatch(WeightsError):
    """The file's keys or shapes do not fit the architecture; ``problems`` lists the first ones."""

    def __init__(self, message: str, problems: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.problems = problems


@dataclass
class WeightsCheck:
    """A file that passed: the trunk's parameter count and what was done to fit it."""

    param_count: int
    details: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- static inspection


def _pickle_globals(data: bytes) -> list[str]:
    """``module.name`` of every global the pickles at the start of ``data`` would look up.

    Reads opcodes only (``pickletools.genops``); nothing is imported or called. ``STACK_GLOBAL``
    takes its two names from the stack, so the strings pushed (and memoised) are tracked.
    """
    found: list[str] = []
    stream = io.BytesIO(data)
    for _ in range(_MAX_PICKLES):
        start = stream.tell()
        if start >= len(data) or data[start] != 0x80:  # every pickle of protocol >= 2 starts with PROTO
            break
        pushed: list[str | None] = []
        memo: dict[int, str | None] = {}
        try:
            for opcode, arg, _pos in pickletools.genops(stream):
                name = opcode.name
                if name in _STRING_OPS:
                    pushed.append(arg if isinstance(arg, str) else None)
                elif name in ("GLOBAL", "INST"):
                    module, _, attr = str(arg).partition(" ")
                    found.append(f"{module}.{attr}")
                    pushed.append(None)
                elif name == "STACK_GLOBAL":
                    module, attr = (pushed[-2], pushed[-1]) if len(pushed) >= 2 else (None, None)
                    found.append(f"{module or '?'}.{attr or '?'}")
                    pushed.append(None)
                elif name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                    memo[int(arg)] = pushed[-1] if pushed else None
                elif name in ("BINGET", "LONG_BINGET", "GET"):
                    pushed.append(memo.get(int(arg)))
                elif name == "STOP":
                    break
                else:
                    pushed.append(None)
        except (ValueError, IndexError, struct.error):
            # Raw storage bytes after the last pickle, or junk: the weights-only loader judges it.
            break
    return found


def _judge_globals(names: list[str]) -> None:
    """Refuse pickles that would build a model object or run code, naming what they contain."""
    classes = [n for n in names if n.startswith(("torch.nn.modules.", "torchvision.", "__main__."))]
    if classes:
        raise WeightsRefused(
            f"the file holds a whole pickled model ({classes[0]}), saved with torch.save(model), not "
            "its weights; loading it would need (and run) that model's code. " + _SAVE_STATE_DICT
        )
    other = [
        n
        for n in names
        if n.startswith(_CODE_TORCH_PREFIXES)
        or (not n.startswith(_DATA_GLOBAL_PREFIXES) and n not in _DATA_BUILTINS)
    ]
    if other:
        raise WeightsRefused(
            f"the file was refused: loading it would call {other[0]}, so it could run code. Tessera "
            "accepts only weights. " + _SAVE_STATE_DICT
        )


def sniff_weights(path: Path) -> str:
    """The file's format, ``safetensors`` or ``torch``, judged from its bytes without loading it.

    Raises :class:`WeightsRefused` for TorchScript archives, pickled modules, pickles that would
    run code, programs and anything else that is not a weights file, with what to upload instead.
    """
    with path.open("rb") as handle:
        head = handle.read(16)
    if len(head) == 0:
        raise WeightsRefused("the file is empty.")
    if len(head) >= 9:
        (header_size,) = struct.unpack("<Q", head[:8])
        if 0 < header_size < 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    if head.startswith((b"\x7fELF", b"MZ", b"#!", b"\xca\xfe\xba\xbe", b"\xcf\xfa\xed\xfe")):
        raise WeightsRefused(f"the file is a program or script, not weights. {_SAVE_STATE_DICT}")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if any("/code/" in n or n.endswith("constants.pkl") for n in names):
                raise WeightsRefused(
                    "the file is a TorchScript archive (torch.jit.save): a compiled program, not "
                    "weights. Upload the model's state dict instead: torch.save(model.state_dict(), "
                    "'weights.pt'), or a .safetensors file. (From a TorchScript module m, "
                    "m.state_dict() gives the same weights.)"
                )
            data_pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
            if not data_pkl:
                raise WeightsRefused(
                    "the file is a zip archive but not one written by torch.save. " + _SAVE_STATE_DICT
                )
            _judge_globals(_pickle_globals(archive.read(data_pkl[0])))
        return "torch"
    if head[:1] == b"\x80":
        with path.open("rb") as handle:
            # The pickles of a legacy torch.save file are at its start; storages follow.
            _judge_globals(_pickle_globals(handle.read(1 << 20)))
        return "torch"
    raise WeightsRefused(
        "the file is neither safetensors nor a PyTorch weights file (torch.save). " + _SAVE_STATE_DICT
    )


def _read_tensors(path: Path, kind: str) -> dict[str, torch.Tensor]:
    """The file's name -> tensor mapping (safetensors, or ``torch.load(weights_only=True)``)."""
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsRefused(f"the file is not a valid safetensors file: {exc}") from exc
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only=True refuses any global outside torch's allow-list; say so in the user's terms.
        lines = str(exc).splitlines()
        reason = next(
            (line.strip() for line in lines if "Unsupported global" in line), lines[0] if lines else ""
        )
        raise WeightsRefused(
            "the file contains Python objects other than tensors, which are refused because loading "
            f"them could run code ({reason[:200]}). " + _SAVE_STATE_DICT
        ) from exc
    except Exception as exc:  # the safe unpickler fails in many ways on junk
        raise WeightsRefused(f"the file could not be read as PyTorch weights: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise WeightsRefused("the file does not contain a state dict (a mapping of names to tensors).")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if len(tensors) != len(obj):
        others = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))[:5]
        raise WeightsRefused(
            f"the file's mapping has entries that are not tensors ({', '.join(others)}). " + _SAVE_STATE_DICT
        )
    return tensors


# --------------------------------------------------------------------------- normalising and checking


def _strip_wrappers(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Remove prefixes shared by every key (``module.model.conv1.weight`` -> ``conv1.weight``)."""
    stripped: list[str] = []
    while True:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            return state, stripped
        state = {k[len(prefix) :]: v for k, v in state.items()}
        stripped.append(prefix)


def _natural_key(key: str) -> list[tuple[int, int, str]]:
    """Sort key that puts ``classifier.3`` before ``classifier.10`` (numbers before names)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in key.split(".")]


def _expected_trunk(architecture: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the architecture's trunk, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        trunk = _build_trunk(architecture, 3)
    return {k: tuple(v.shape) for k, v in trunk.state_dict().items()}


def _mismatches(
    expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    shapes = sorted(k for k in state if k in expected and tuple(state[k].shape) != expected[k])
    problems: list[dict[str, Any]] = []
    for key in shapes:
        problems.append(
            {
                "kind": "shape",
                "key": key,
                "file_shape": list(state[key].shape),
                "model_shape": list(expected[key]),
                "message": f"{key}: the file has shape {tuple(state[key].shape)}, the architecture "
                f"expects {expected[key]}",
            }
        )
    for key in missing:
        problems.append({"kind": "missing", "key": key, "message": f"{key}: missing from the file"})
    for key in unexpected:
        problems.append(
            {"kind": "unexpected", "key": key, "message": f"{key}: in the file, not in the architecture"}
        )
    counts = {"missing": len(missing), "unexpected": len(unexpected), "shape": len(shapes)}
    return problems, counts


def check_weights(architecture: str, source: Path, dest: Path) -> WeightsCheck:
    """Validate ``source`` as weights for ``architecture``; write the trunk state dict to ``dest``.

    ``dest`` (safetensors) holds torchvision-named trunk keys only, so that
    ``build_backbone(architecture, d, weights_path=dest)`` loads it strictly. Raises
    :class:`WeightsRefused` or :class:`WeightsMismatch` (both :class:`WeightsError`) with a message
    for the user; nothing is written then.
    """
    if architecture not in BACKBONES:
        raise WeightsError(f"unknown architecture {architecture!r}")
    kind = sniff_weights(source)
    state, stripped = _strip_wrappers(_read_tensors(source, kind))
    details: dict[str, Any] = {"format": kind, "tensors_in_file": len(state)}
    if stripped:
        details["stripped_prefixes"] = stripped
    head_prefixes = BACKBONES[architecture].ignored_prefixes
    head = {k: v for k, v in state.items() if k.startswith(head_prefixes)}
    if head:
        # The class count is the output size of the head's last Linear (MobileNetV3 has two).
        linears = [k for k in sorted(head, key=_natural_key) if head[k].dim() == 2]
        weight = head[linears[-1]] if linears else None
        details["dropped_head"] = {
            "keys": sorted(head),
            "classes": int(weight.shape[0]) if weight is not None else None,
        }
        state = {k: v for k, v in state.items() if k not in head}
    expected = _expected_trunk(architecture)
    # BatchNorm's step counters are bookkeeping that old checkpoints lack; the model's own zeros do.
    filled = sorted(k for k in expected if k.endswith("num_batches_tracked") and k not in state)
    for key in filled:
        state[key] = torch.zeros((), dtype=torch.long)
    if filled:
        details["filled_batchnorm_counters"] = len(filled)
    problems, counts = _mismatches(expected, state)
    if problems:
        summary = ", ".join(f"{n} {label}" for label, n in counts.items() if n)
        raise WeightsMismatch(
            f"the file does not match {architecture}: {summary} "
            f"(the first {min(len(problems), MAX_LISTED_MISMATCHES)} are listed). Check that the "
            "architecture is the one the weights were trained with.",
            problems[:MAX_LISTED_MISMATCHES],
        )
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in state.values() if v.is_floating_point()})
    details["dtypes"] = dtypes
    from safetensors.torch import save_file

    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f"{dest.stem}.partial.safetensors")
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(partial))
    try:
        backbone = build_backbone(architecture, 8, weights_path=partial)  # the engine's strict load
        backbone.eval()
        with torch.no_grad():
            features = backbone.trunk(torch.randn(1, 3, CHECK_IMAGE_SIZE, CHECK_IMAGE_SIZE))
        if not torch.isfinite(features).all():
            raise WeightsMismatch(
                "the weights load, but a forward pass gives NaN or infinite values: the file holds "
                "non-finite numbers.",
                [{"kind": "values", "key": "", "message": "forward pass output is not finite"}],
            )
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(dest)
    details["forward_check"] = f"1x3x{CHECK_IMAGE_SIZE}x{CHECK_IMAGE_SIZE} on CPU -> {tuple(features.shape)}"
    param_count = sum(p.numel() for p in backbone.trunk.parameters())
    return WeightsCheck(param_count=param_count, details=details)


# --------------------------------------------------------------------------- catalog facts


def imagenet_weights(architecture: str) -> dict[str, Any]:
    """Where torchvision's ImageNet weights for ``architecture`` are looked for in the local torch
    cache (``torch.hub.get_dir()/checkpoints``), whether they are there, and where they come from."""
    constructor = BACKBONE_CATALOG[architecture].constructor
    url = tvm.get_model_weights(constructor).DEFAULT.url
    filename = url.rsplit("/", 1)[-1]
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    return {"filename": filename, "url": url, "path": str(path), "present": path.is_file()}


def describe_architecture(architecture: str, *, device: str = "cpu", patch_size: int = 128) -> dict[str, Any]:
    """Parameter count and training memory per megapixel for a catalog backbone (measured once).

    The memory figures come from the engine's memory model with a calibration measured on
    ``device`` (fp32): for the baseline, what each extra megapixel of image costs (its
    activations and the image); for PatchGD at a fixed number of patches per step, what each
    extra megapixel costs (the image held in memory, the latent map and the head), and what the
    patches in flight cost per megapixel of patches.
    """
    from .config import BaselineConfig, PatchGDConfig
    from .memory import calibrate_backbone, estimate_baseline_bytes, estimate_patchgd_bytes

    calibration = calibrate_backbone(architecture, device=device, patch_size=patch_size)
    terms = {"bytes_per_pixel": calibration.bytes_per_pixel, "overhead_bytes": calibration.overhead_bytes}
    small, large = 8 * patch_size, 16 * patch_size
    megapixels = (large * large - small * small) / 1e6

    def patchgd(size: int, streaming: bool) -> int:
        cfg = PatchGDConfig(
            num_classes=2,
            backbone=architecture,
            image_size=size,
            patch_size=patch_size,
            batch_size=1,
            patches_per_step=16,
        )
        return estimate_patchgd_bytes(cfg, streaming=streaming, **terms).total_bytes

    def baseline(size: int) -> int:
        cfg = BaselineConfig(num_classes=2, backbone=architecture, image_size=size, batch_size=1)
        return estimate_baseline_bytes(cfg, **terms).total_bytes

    with torch.device("meta"):
        trunk = _build_trunk(architecture, 3)
    return {
        "param_count": sum(p.numel() for p in trunk.parameters()),
        "memory": {
            "device": device,
            "precision": "fp32",
            "patch_size": patch_size,
            "activation_bytes_per_pixel": round(calibration.bytes_per_pixel, 1),
            "overhead_bytes": calibration.overhead_bytes,
            "baseline_bytes_per_megapixel": math.ceil((baseline(large) - baseline(small)) / megapixels),
            "patchgd_bytes_per_megapixel": math.ceil(
                (patchgd(large, False) - patchgd(small, False)) / megapixels
            ),
            "patchgd_streamed_bytes_per_megapixel": math.ceil(
                (patchgd(large, True) - patchgd(small, True)) / megapixels
            ),
            "patch_activation_bytes_per_megapixel": math.ceil(calibration.bytes_per_pixel * 1e6),
        },
    }
