"""grounding_dino.memory: with freed memory kept, a loop of large tensor allocations stops page-faulting.

Counted in page faults (getrusage), not time, so the machine's noise cannot move it. Each case runs in a fresh
interpreter because malloc's settings are per process.
"""
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's")

LOOP = """
import resource, torch
from grounding_dino.memory import retain_freed_memory
print(retain_freed_memory())
def churn():
    for _ in range(10):
        torch.empty(11_000_000).fill_(1.0)  # 44 MB, as large as a padded fusion map
churn()
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run_loop(**env):
    done = subprocess.run([sys.executable, "-c", LOOP], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    message, faults = done.stdout.strip().splitlines()
    return message, int(faults)


def test_kept_memory_takes_no_page_faults_where_the_default_faults_on_every_tensor():
    message, kept = run_loop()
    assert message.startswith("malloc keeps freed memory")
    default_message, default = run_loop(GROUNDING_DINO_MALLOC="default")
    assert "GROUNDING_DINO_MALLOC=default" in default_message
    pages = 10 * 44_000_000 // 4096
    assert default > pages // 2, "glibc's default unmaps every 44 MB block, so each loop faults its pages again"
    # Kept: at most a block or two faulted again (one did in a full-suite run), against all ten by default.
    assert kept < pages // 4


def test_run_action_keeps_freed_memory_before_anything_else(tiny_train_spec, tmp_path, monkeypatch):
    """Every action runs with it: run_action asks for it before the pre-check, which here refuses the checkpoint."""
    from conftest import tiny_spec

    from grounding_dino import actions
    from grounding_dino.config import load_experiment
    from grounding_dino.errors import UserError

    calls = []
    monkeypatch.setattr(actions, "retain_freed_memory", lambda: calls.append(1))
    (tmp_path / "model.bin").write_bytes(b"")
    spec = tiny_spec(tiny_train_spec, tmp_path / "results")
    spec["evaluate"] = {"checkpoint": str(tmp_path / "model.bin")}
    with pytest.raises(UserError, match="unknown model file type"):
        actions.run_action("evaluate", load_experiment(spec))
    assert calls == [1]
