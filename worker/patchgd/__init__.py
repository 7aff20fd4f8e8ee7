"""The PatchGD engine: a pure library (torch, numpy, image readers; no web, database or queue).

The names below are the engine's public surface; everything a training task needs::

    from worker.patchgd import PatchGDConfig, scan_dataset, make_loaders, train, export_all

- configs: ``PatchGDConfig``, ``BaselineConfig``, ``config_from_dict``, ``list_backbones``
- data: ``scan_dataset``, ``make_loaders``, ``open_region_reader``, ``StreamingPatchSource``
- training and use: ``train``, ``evaluate``, ``predict``, ``patch_evidence`` (per-cell evidence of
  a PatchGD prediction, ``PatchEvidence``), ``export_all``, ``load_model``
- memory: ``plan`` (both algorithms), ``plan_patchgd``, ``plan_baseline``
- errors: ``EngineError`` and its subclasses ``ConfigError``, ``DatasetError``, ``ImageError``,
  ``WeightsError``, ``CheckpointError``, ``ExportError``; catch ``EngineError`` to tell a user's
  mistake (its message is meant for the user) from a bug.

Configs, the backbone list and the errors load without torch, so the web process can validate
task hyperparameters with the engine's own rules; every other name is imported on first use
(PEP 562), so ``import worker.patchgd.config`` never pulls in torch, numpy or Pillow.
The modules (``config``, ``grid``, ``models``, ``train``, ``data``, ``memory``, ``checkpoint``,
``metrics``, ``infer``, ``export``, ``testing``) stay importable for finer-grained work with
``from worker.patchgd.<module> import ...``; ``worker.patchgd.train`` is the function, not the module.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from .catalog import list_backbones
from .config import BaselineConfig, PatchGDConfig, config_from_dict
from .errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    EngineError,
    ExportError,
    ImageError,
    WeightsError,
)

if TYPE_CHECKING:
    from .data import StreamingPatchSource, make_loaders, open_region_reader, scan_dataset
    from .export import export_all, load_model
    from .infer import PatchEvidence, patch_evidence, predict
    from .memory import plan, plan_baseline, plan_patchgd
    from .train import evaluate, train

# Public name -> the module that defines it, imported on first access (these need torch).
_LAZY: dict[str, str] = {
    "scan_dataset": "data",
    "make_loaders": "data",
    "open_region_reader": "data",
    "StreamingPatchSource": "data",
    "train": "train",
    "evaluate": "train",
    "predict": "infer",
    "patch_evidence": "infer",
    "PatchEvidence": "infer",
    "export_all": "export",
    "load_model": "export",
    "plan": "memory",
    "plan_patchgd": "memory",
    "plan_baseline": "memory",
}

__all__ = [
    "BaselineConfig",
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "EngineError",
    "ExportError",
    "ImageError",
    "PatchEvidence",
    "PatchGDConfig",
    "StreamingPatchSource",
    "WeightsError",
    "config_from_dict",
    "evaluate",
    "export_all",
    "list_backbones",
    "load_model",
    "make_loaders",
    "open_region_reader",
    "patch_evidence",
    "plan",
    "plan_baseline",
    "plan_patchgd",
    "predict",
    "scan_dataset",
    "train",
]


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f".{module_name}", __name__)
    try:
        value = getattr(module, name)
    except AttributeError:
        raise AttributeError(
            f"{__name__}.{name} is not available: {module.__name__} does not define it"
        ) from None
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps the public function ``train`` from being hidden by the ``train`` submodule.

    Importing a submodule binds it as an attribute of its package, so once anything imported
    ``worker.patchgd.train`` (the module), ``worker.patchgd.train`` would stop being the function.
    The module stays reachable as ``from worker.patchgd.train import ...`` and in ``sys.modules``.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
