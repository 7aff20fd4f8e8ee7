"""A task's memory budget at training start: capped on CUDA (skipped without a GPU), checked on CPU;
and how the API reports the measured peak against it. The CPU run through a real worker is in
tests/workers/test_serve_workers.py."""

from __future__ import annotations

import pytest
import torch

from backend.models import Task
from backend.training.schemas import GIB, TaskMemory
from worker.tasks.training import apply_budget


def test_on_cpu_a_budget_is_checked_not_enforced():
    assert apply_budget(None, torch.device("cpu")) is None
    assert apply_budget(2.0, torch.device("cpu")) == {"device": "cpu", "enforced": False}


def _task(budget: float | None, peak: int, setup: dict | None) -> Task:
    return Task(
        memory_budget_gib=budget, peak_memory_bytes=peak, artifacts={"memory": setup} if setup else {}
    )


def test_the_measured_peak_is_reported_against_the_budget():
    over = TaskMemory.of(_task(0.5, GIB, {"device": "cpu", "enforced": False}))
    assert (over.peak_bytes, over.budget_bytes, over.within_budget) == (GIB, GIB // 2, False)
    assert over.warning == (
        "The measured peak, 1.00 GiB, exceeded the memory budget of 0.5 GiB "
        "(on CPU a budget is checked, not enforced)."
    )
    under = TaskMemory.of(_task(2.0, GIB, {"device": "cpu", "enforced": False}))
    assert under.within_budget is True and under.warning is None
    assert TaskMemory.of(_task(None, GIB, None)).within_budget is None
    assert TaskMemory.of(_task(1.0, 0, None)).within_budget is None  # nothing measured yet


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_allocator_is_capped_at_the_budget_and_lifted_for_the_next_task():
    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(0).total_memory
    budget_gib = 1.0
    setup = apply_budget(budget_gib, device)
    assert setup["device"] == "cuda" and setup["enforced"] is True
    assert setup["fraction"] == pytest.approx(budget_gib * GIB / total, rel=1e-3)
    try:
        # Twice the budget cannot be allocated although the card has far more free.
        with pytest.raises(torch.cuda.OutOfMemoryError):
            torch.empty(int(2 * budget_gib * GIB), dtype=torch.uint8, device=device)
        small = torch.empty(int(0.25 * budget_gib * GIB), dtype=torch.uint8, device=device)
        del small
    finally:
        torch.cuda.empty_cache()
        assert apply_budget(None, device) is None
    # The next task without a budget may use more than the old cap again.
    big = torch.empty(int(2 * budget_gib * GIB), dtype=torch.uint8, device=device)
    del big
    torch.cuda.empty_cache()
