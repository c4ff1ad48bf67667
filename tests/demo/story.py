"""What every telling of the demo's story must show, on either tier (tests/demo, tests/real)."""

from __future__ import annotations

import subprocess


def assert_story_told(res: subprocess.CompletedProcess[str]) -> str:
    """The demo exited 0 after a webhook-queued good deploy, a broken one rolled back and verified, and
    drift found then healed; returns its output for the caller's own checks."""
    out = res.stdout
    assert res.returncode == 0, f"exit {res.returncode}\n{out[-6000:]}\n{res.stderr[-3000:]}"
    assert "webhook answered 202: queued" in out
    assert "deploy ended Completed;" in out
    failed = next(ln for ln in out.splitlines() if "deploy ended Failed:" in ln)
    assert "; rolled back; Git names " in failed and ", verified serving " in failed, failed
    assert "drift check: Failed: 1 of 3 app environments drifted: workout-api/dev: drifted" in out
    assert "drift check after healing: Completed" in out
    return out
