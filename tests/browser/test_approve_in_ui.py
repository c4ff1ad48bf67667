"""A promotion to prod approved in the Prefect UI by a real browser: Debian's Chromium, driven by
Playwright (tests/browser/approve.mjs), opens the suspended run, fills in the approval form and
submits it; the run resumes and prod serves the promoted digest. The filled form's screenshot is kept
in tests/output/ (git-ignored)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from delivery.config import load_config
from delivery.settings import PROJECT_ROOT
from tests.flows.conftest import health
from tests.promotion_stack import APP, PromotionStack, promotion_stack
from tests.source_clone import SourceClone

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
PLAYWRIGHT = PROJECT_ROOT / ".tools" / "npm" / "node_modules" / "playwright-core"
SCRIPT = Path(__file__).with_name("approve.mjs")
OUTPUT = PROJECT_ROOT / "tests" / "output"


@pytest.fixture(scope="module")
def ps(sandbox: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PromotionStack]:
    missing = [str(p) for p in (CHROMIUM, PLAYWRIGHT) if not p.exists()] + ([] if shutil.which("node") else ["node"])
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run scripts/setup.sh (it installs Debian's chromium and "
                    "playwright-core under .tools/npm)")
    with promotion_stack(sandbox, tmp_path_factory.mktemp("browser")) as stack:
        yield stack


def _answer_in_browser(url: str, approver: str, comment: str, screenshot: Path) -> dict[str, Any]:
    res = subprocess.run(["node", str(SCRIPT), "--url", url, "--approver", approver, "--comment", comment,
                          "--screenshot", str(screenshot)], capture_output=True, text=True, timeout=180,
                         check=False, cwd=PROJECT_ROOT)
    assert res.returncode == 0, f"approve.mjs failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_prod_promotion_approved_in_the_prefect_ui_serves_the_promoted_digest(ps, sandbox, tmp_path):
    """The form in the UI shows the tag and digest; approving it there resumes the run and prod serves that digest."""
    source = SourceClone(str(sandbox.source_remote), tmp_path / "src")
    sha = source.commit("release-dev", note="approved in the browser")
    tag = f"release-dev-{sha[:7]}"
    assert ps.deploy_dev(sha).state.is_completed()
    assert ps.promote("dev", "staging", tag=tag).state.is_completed()
    digest = next(iter(ps.serving_digests("staging")))

    run = ps.promote("staging", "prod", tag=tag, timeout=0)
    ps.wait_state(run.id, lambda r: r.state_name == "Suspended", 120, "the promotion to wait for its approval")
    OUTPUT.mkdir(parents=True, exist_ok=True)
    shot = OUTPUT / "approval-form.png"
    started = time.monotonic()
    answer = _answer_in_browser(f"{ps.ui_url}/runs/flow-run/{run.id}", "Grace Hopper", "verified in staging",
                                shot)
    browser_s = time.monotonic() - started
    form = answer["form"]
    for shown in (f"Promote {APP} from staging to prod", tag, "Verified in staging at", "Verification report"):
        assert shown in form, shown
    assert digest in "".join(form.split()), "the form shows the digest (in two halves, so that it fits)"
    assert shot.exists() and shot.stat().st_size > 10_000
    shutil.copy(shot, tmp_path / shot.name)

    done = ps.wait_state(run.id, lambda r: r.state is not None and r.state.is_final(), 300, "the promotion to end")
    assert done.state.is_completed(), done.state.message
    assert health(load_config().app(APP).environment("prod").health_url)[1]["version"] == tag
    assert digest in ps.serving_digests("prod")
    report = ps.report(run.id, f"promote-{APP}-prod")
    assert "approved by Grace Hopper: verified in staging" in report
    print(f"browser: form opened, filled and submitted in {browser_s:.1f} s; screenshot {shot}")
