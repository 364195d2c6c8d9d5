"""Processes a test launches die with it: Ctrl-C of pytest (SIGINT to its process group,
as a terminal sends it) or SIGTERM to pytest (a CI timeout) while a launcher's children
run. The children here ignore SIGINT, as the ranks do (they catch it to checkpoint), and
the launcher dies of it, as torchrun did when subprocess.run killed it: with the launch
in pytest's own process group they lived on with parent 1 (the ranks of an interrupted
test run did)."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from .conftest import ROOT
from .helpers import start, stop

pytestmark = pytest.mark.launched

LAUNCHER = """
import subprocess, sys, time
rank = (
    "import os, signal, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "open(os.path.join(sys.argv[1], str(os.getpid())), 'w').close(); time.sleep(600)"
)
kids = [subprocess.Popen([sys.executable, "-c", rank, sys.argv[1]]) for _ in range(2)]
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupted_test_run_leaves_no_process_behind(tmp_path, how):
    pids = tmp_path / "pids"  # each rank writes its pid there once it ignores SIGINT
    pids.mkdir()
    (tmp_path / "launcher.py").write_text(LAUNCHER)
    (tmp_path / "test_inner.py").write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(ROOT)!r})
            from tests.helpers import run_command

            def test_launch():
                run_command([sys.executable, {str(tmp_path / "launcher.py")!r}, {str(pids)!r}], timeout=600)
            """
        )
    )
    inner = start([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_inner.py")])
    try:
        t0 = time.time()
        while len(list(pids.iterdir())) < 2:
            assert inner.poll() is None and time.time() - t0 < 120, "the inner test did not start its launcher"
            time.sleep(0.05)
        ranks = [int(p.name) for p in pids.iterdir()]
        if how == "ctrl-c":
            os.killpg(inner.pid, signal.SIGINT)  # what the terminal does: the foreground group
        else:
            inner.send_signal(signal.SIGTERM)
        inner.wait(timeout=60)
        t0 = time.time()
        while any(_alive(p) for p in ranks) and time.time() - t0 < 10:
            time.sleep(0.05)
        assert not [p for p in ranks if _alive(p)], "launched processes outlived the interrupted test"
    finally:
        stop(inner)
        for p in [int(x.name) for x in pids.iterdir()]:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
