"""scripts/check_readme.py, the README's examples runner that CI calls after `make demo`."""

from __future__ import annotations

import importlib.util
import os
import signal
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_readme", ROOT / "scripts" / "check_readme.py")
check_readme = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_readme)


def test_a_block_with_a_background_server_ends_with_its_last_command(tmp_path):
    """The quality-gate block starts `medqm serve &`: the block must end when its commands do, not when the
    server would, and the server must be stopped (here: a sleep that records its pid)."""
    pidfile = tmp_path / "pid"
    cmds = [f"sleep 600 & echo $! > {pidfile}", "echo done"]
    res = check_readme.run_block(cmds, tmp_path, timeout=120)
    assert res.returncode == 0 and "done" in res.stdout
    pid = int(pidfile.read_text())
    for _ in range(50):  # SIGTERM was sent; give the kernel a moment to reap it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("the block's background job outlived the block")


def test_a_failing_command_fails_its_block(tmp_path):
    res = check_readme.run_block(["true", "false", "echo never"], tmp_path, timeout=60)
    assert res.returncode != 0 and "never" not in res.stdout


def test_setup_lines_and_unbuilt_collections_are_skipped(tmp_path):
    run, skipped = check_readme.runnable(["make demo", "pip install -e '.[serve]'", "medqm data summary data/br35h",
                                          "medqm info data/demo"], tmp_path)
    assert run == ["medqm info data/demo"]
    assert len(skipped) == 3 and any("needs `make data`" in s for s in skipped)


def test_continuation_lines_are_joined_and_comments_dropped():
    cmds = check_readme.commands("# a comment\nmedqm score a \\\n  --out b.csv\n\necho x   # trailing\n")
    assert [" ".join(c.split()) for c in cmds] == ["medqm score a --out b.csv", "echo x # trailing"]
