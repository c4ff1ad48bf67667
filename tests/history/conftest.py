"""One history to read: a good deploy, a deploy that fails and is rolled back, and a manual
rollback, run in this process on the session's sandbox and Prefect server.

They use the staging environment (branch `main`): the flow tests use dev, so the newest staging
runs of the session's server are these three."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from delivery.settings import get_settings
from flows.deploy import deploy
from flows.rollback import rollback
from tasks.images import image_tags
from tests.source_clone import SourceClone

APP, ENV, BRANCH = "workout-api", "staging", "main"
FAST = {"sync_timeout": 120.0, "rollout_timeout": 60.0, "health_timeout": 60.0}


@dataclass
class History:
    good_tag: str
    bad_tag: str
    rollback_tag: str
    good_sha: str
    bad_sha: str


@pytest.fixture(scope="module")
def history_runs(sandbox, prefect_api, tmp_path_factory: pytest.TempPathFactory) -> History:
    get_settings.cache_clear()
    source = SourceClone(str(sandbox.source_remote), tmp_path_factory.mktemp("history") / "src")

    def run_deploy(sha: str):
        return deploy(app=APP, environment=ENV, source_ref=f"refs/heads/{BRANCH}", source_sha=sha,
                      return_state=True, **FAST)

    good = source.commit(BRANCH, note="history good")
    state = run_deploy(good)
    assert state.is_completed(), state.message
    bad = source.commit(BRANCH, healthy=False, note="history bad")
    state = run_deploy(bad)
    assert state.is_failed() and "rolled back" in state.message, state.message
    state = rollback(app=APP, environment=ENV, to_tag=sandbox.initial_tag, reason="history manual",
                     return_state=True, **FAST)
    assert state.is_completed(), state.message
    return History(good_tag=image_tags(BRANCH, good)[0], bad_tag=image_tags(BRANCH, bad)[0],
                   rollback_tag=sandbox.initial_tag, good_sha=good, bad_sha=bad)
