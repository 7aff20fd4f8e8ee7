"""The measuring child of `worker.patchgd.memory.measure_peak`.

    python -m worker.patchgd.measure_child FD < spec.json

The spec (JSON on stdin) names a workload (``"package.module:function"``), its JSON arguments, the
device and the sampling interval. The child reports on file descriptor FD, one JSON object per
line: ``{"kind": "baseline", "bytes": ...}`` as soon as its memory baseline is known (so the
parent can watch growth against a limit), then ``{"kind": "outcome", ...}``.

A plain `subprocess` child, not a `multiprocessing` one: Celery's prefork pool runs tasks in
daemonic processes, which `multiprocessing` forbids to have children, while an exec'ed
interpreter is allowed anywhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any


def _die_with_parent(parent_pid: int) -> None:
    """On Linux, have the kernel kill this child when the measuring parent dies (a killed worker
    must not leave a workload running); elsewhere the parent's own clean-up is all there is."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before the request above took effect
        os._exit(1)


def main(argv: list[str]) -> int:
    """Run the workload described on stdin and report on the descriptor named in argv[1]."""
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    report = os.fdopen(int(argv[1]), "w", buffering=1, encoding="utf-8")

    def send(message: dict[str, Any]) -> None:
        report.write(json.dumps(message) + "\n")
        report.flush()

    spec = json.load(sys.stdin)
    _die_with_parent(int(spec["parent_pid"]))
    from .memory import _resolve, _run_measured

    try:
        fn = _resolve(spec["fn"])
    except Exception as exc:  # noqa: BLE001 - reported to the parent as an error result
        send({"kind": "outcome", "status": "error", "reason": f"cannot load workload: {exc}"})
        return 0
    status, peak, baseline, reason, result = _run_measured(
        fn,
        tuple(spec["args"]),
        dict(spec["kwargs"]),
        spec["device"],
        float(spec["interval_s"]),
        on_baseline=lambda b: send({"kind": "baseline", "bytes": b}),
    )
    outcome = {"kind": "outcome", "status": status, "peak": peak, "baseline": baseline, "reason": reason}
    try:
        send({**outcome, "result": result})
    except (TypeError, ValueError) as exc:  # a result JSON cannot carry must not hide the measurement
        send({**outcome, "reason": f"result not transferable: {exc}"})
    report.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
