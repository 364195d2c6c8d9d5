"""A pytest plugin for the device call: each check's outcome as one JSON line, appended to
$WLORA_GPU_RESULTS as the check ends (so a call cut short keeps the checks that ended).

    python -m pytest -p benchmarks.gpu.pytest_lines -m gpu tests/test_gpu.py
"""

from __future__ import annotations

import json
import os


def pytest_runtest_logreport(report) -> None:
    path = os.environ.get("WLORA_GPU_RESULTS")
    # One line per check: its call phase, or the setup / teardown phase that failed or skipped it.
    if not path or (report.when != "call" and report.passed):
        return
    message = ""
    if report.failed:
        message = str(report.longrepr).strip().splitlines()[-1][:500] if report.longrepr else ""
    elif report.skipped and isinstance(report.longrepr, tuple):
        message = str(report.longrepr[2])[:500]
    line = {
        "kind": "check",
        "name": report.nodeid.split("::", 1)[-1],
        "outcome": report.outcome if report.when == "call" else f"{report.outcome} in {report.when}",
        "seconds": round(report.duration, 3),
        "message": message,
    }
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
