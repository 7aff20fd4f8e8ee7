"""Memory plans in words, and accepting one.

A plan report (written by the ``memory.plan`` job) holds, per algorithm, what the settings as
given would need and what the planner chose under the budget. :func:`plan_sentence` says it in
one sentence ("the baseline must shrink 4096² to 1536² to fit 4 GiB; PatchGD fits at full
resolution with k=8"); :func:`accepted_values` is what accepting one algorithm's plan puts into
the new-task form; :func:`plan_for_task` is what a task created from it keeps (``task.plan``).
"""

from __future__ import annotations

from typing import Any

GIB = 1 << 30
NAMES = {"patchgd": "PatchGD", "baseline": "the baseline"}


def _gib(value: float) -> str:
    return f"{value:g} GiB"


def _bytes(value: int | None) -> str:
    return "?" if value is None else f"{value / GIB:.2f} GiB"


def _patchgd_phrase(entry: dict[str, Any], budget: str) -> str:
    asked = entry.get("requested") or {}
    size = asked.get("image_size")
    if not entry.get("fits"):
        return (
            f"PatchGD does not fit {budget} at {size}² even with batch 1 and k=1 "
            f"(that needs about {_bytes(entry.get('predicted_bytes'))})"
        )
    k, batch = entry.get("patches_per_step"), entry.get("batch_size")
    changes = []
    if k != asked.get("patches_per_step"):
        changes.append(f"k={k} (not {asked.get('patches_per_step')})")
    if batch != asked.get("batch_size"):
        changes.append(f"batch {batch} (not {asked.get('batch_size')})")
    if not changes:
        return f"PatchGD fits {budget} at full resolution ({size}²) as set, with k={k} and batch {batch}"
    return f"PatchGD fits {budget} at full resolution ({size}²) with " + " and ".join(changes)


def _baseline_phrase(entry: dict[str, Any], budget: str) -> str:
    asked = entry.get("requested") or {}
    size = asked.get("image_size")
    if not entry.get("fits"):
        return f"the baseline does not fit {budget} even at 32² with batch 1"
    chosen_size, batch = entry.get("image_size"), entry.get("batch_size")
    if chosen_size != size:
        return f"the baseline must shrink {size}² to {chosen_size}² (batch {batch}) to fit {budget}"
    if batch != asked.get("batch_size"):
        return (
            f"the baseline fits {budget} at full resolution ({size}²) with batch {batch} "
            f"(not {asked.get('batch_size')})"
        )
    return f"the baseline fits {budget} at full resolution ({size}²) as set, with batch {batch}"


def algorithm_phrase(algorithm: str, entry: dict[str, Any], budget_gib: float) -> str:
    """One algorithm's plan in words."""
    budget = _gib(budget_gib)
    if algorithm == "patchgd":
        return _patchgd_phrase(entry, budget)
    return _baseline_phrase(entry, budget)


def plan_sentence(report: dict[str, Any]) -> str:
    """The whole plan in one sentence: the baseline first, then PatchGD (whichever were planned)."""
    entries = report.get("algorithms") or {report.get("algorithm", "patchgd"): report}
    budget = float(report.get("budget_gib") or (report.get("plan") or {}).get("budget_bytes", 0) / GIB)
    parts = [
        algorithm_phrase(name, entries[name], budget) for name in ("baseline", "patchgd") if name in entries
    ]
    sentence = "; ".join(parts)
    return (sentence[:1].upper() + sentence[1:] + ".") if sentence else ""


def accepted_values(report: dict[str, Any], algorithm: str) -> dict[str, Any]:
    """The form fields accepting ``algorithm``'s plan sets: the algorithm, batch size, patches per
    step (PatchGD; the sampling fraction is cleared, k replaces it) and image size, plus the budget.
    Raises ValueError when that algorithm was not planned or does not fit."""
    entry = (report.get("algorithms") or {}).get(algorithm)
    if entry is None:
        raise ValueError(f"this plan has no {NAMES.get(algorithm, algorithm)} part")
    if not entry.get("fits"):
        raise ValueError(f"{NAMES[algorithm]} does not fit the budget: there is no plan to accept")
    values: dict[str, Any] = {
        "algorithm": algorithm,
        "batch_size": entry["batch_size"],
        "image_size": entry["image_size"],
        "memory_budget_gib": report.get("budget_gib"),
    }
    if algorithm == "patchgd":
        values["patches_per_step"] = entry["patches_per_step"]
        values["sampling"] = ""
    return values


def plan_for_task(report: dict[str, Any], algorithm: str, token: str) -> dict[str, Any]:
    """What a task created from an accepted plan keeps as ``task.plan``."""
    entry = dict((report.get("algorithms") or {})[algorithm])
    return {
        "token": token,
        "accepted": algorithm,
        "budget_gib": report.get("budget_gib"),
        "device": report.get("device"),
        "summary": plan_sentence(report),
        "phrase": algorithm_phrase(algorithm, entry, float(report.get("budget_gib") or 0)),
        **{k: entry.get(k) for k in ("fits", "verified", "batch_size", "patches_per_step", "image_size")},
        "predicted_bytes": entry.get("predicted_bytes"),
        "measured_bytes": entry.get("measured_bytes"),
        "requested": entry.get("requested"),
        "requested_bytes": entry.get("requested_bytes"),
        "reason": entry.get("reason"),
    }
