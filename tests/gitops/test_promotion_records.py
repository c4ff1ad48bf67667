"""What a promotion reads from the GitOps repository: each verification with the digest recorded for
it (the note's `digest=`, or an older note's values commit), and the rollbacks since a time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from tasks.gitops import checkout, commit_and_push
from tasks.records import record_verified, rollbacks_since, verifications, verified_digest
from tasks.trailers import commit_message, trailer_map
from tasks.values import bump_image_tag
from tests.gitops.conftest import AUTHOR, run_git

APP = "workout-api"
D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64


def _commit(repo, env: str, tag: str, kind: str = "bump", digest: str | None = None, app: str = APP) -> str:
    bump_image_tag(Path(repo.working_tree_dir) / f"envs/{env}/values.yaml", tag)
    msg = commit_message(kind, tag, app=app, environment=env, digest=digest, source_sha="a" * 40)
    return commit_and_push(repo, [f"envs/{env}/values.yaml"], msg, author=AUTHOR).sha


def test_the_verification_note_records_the_digest(remote: Path, clone_dir) -> None:
    """A verification recorded with its digest reads back with it, newest first, per app and environment."""
    repo = checkout(str(remote), "main", clone_dir("a"))
    c1 = _commit(repo, "dev", "1.0.0", digest=D1)
    record_verified(repo, c1, app=APP, environment="dev", tag="1.0.0", digest=D1)
    c2 = _commit(repo, "dev", "1.1.0", digest=D2)
    record_verified(repo, c2, app=APP, environment="dev", tag="1.1.0", digest=D2)
    record_verified(repo, c2, app="nutrition-api", environment="dev", tag="9.9.9", digest=D1)
    note = run_git(remote, "notes", "--ref=delivery", "show", c2)
    assert f"verified app={APP} env=dev tag=1.1.0 at=" in note and f" digest={D2}" in note
    vs = verifications(repo, APP, "dev")
    assert [(v.commit, v.tag, v.digest) for v in vs] == [(c2, "1.1.0", D2), (c1, "1.0.0", D1)]
    assert all(v.at_datetime is not None for v in vs)
    assert verifications(repo, APP, "prod") == []


def test_an_older_note_without_a_digest_falls_back_to_its_values_commit(remote: Path, clone_dir) -> None:
    """A note from before digests were noted takes the digest its own bump commit names, and only that."""
    repo = checkout(str(remote), "main", clone_dir("a"))
    c1 = _commit(repo, "dev", "1.0.0", digest=D1)
    assert trailer_map(run_git(remote, "log", "-1", "--format=%B", c1))["delivery-image-digest"] == D1
    record_verified(repo, c1, app=APP, environment="dev", tag="1.0.0")
    (v,) = verifications(repo, APP, "dev")
    assert v.digest == "" and verified_digest(repo, v, app=APP, environment="dev") == D1
    # A commit message from before the trailer: the body line.
    run_git(Path(repo.working_tree_dir), "commit", "-q", "--allow-empty", "-m",
            f"chore(helm): update image tag to 0.9.0\n\nImage digest: {D2}\n\nDelivery-Pipeline: values-bump\n"
            f"Delivery-App: {APP}\nDelivery-Environment: dev\nDelivery-Tag: 0.9.0\n")
    run_git(Path(repo.working_tree_dir), "push", "-q", "origin", "HEAD:main")
    old = run_git(Path(repo.working_tree_dir), "rev-parse", "HEAD").strip()
    record_verified(repo, old, app=APP, environment="dev", tag="0.9.0")
    v09 = next(v for v in verifications(repo, APP, "dev") if v.tag == "0.9.0")
    assert verified_digest(repo, v09, app=APP, environment="dev") == D2
    # A note on a commit that is not this tag's bump (the tag was already in Git): no digest to trust.
    other = _commit(repo, "prod", "5.0.0", digest=D1)
    record_verified(repo, other, app=APP, environment="dev", tag="1.0.0")
    v_other = next(v for v in verifications(repo, APP, "dev") if v.commit == other)
    assert verified_digest(repo, v_other, app=APP, environment="dev") == ""


def test_rollbacks_since_a_time_are_the_apps_own(remote: Path, clone_dir) -> None:
    """Rollback commits of this app and environment after `since` are found; bumps and others are not."""
    repo = checkout(str(remote), "main", clone_dir("a"))
    before = datetime.now(UTC) - timedelta(seconds=5)
    _commit(repo, "dev", "1.0.0")
    rb = _commit(repo, "dev", "0.9.0", kind="rollback")
    _commit(repo, "prod", "0.8.0", kind="rollback")
    _commit(repo, "dev", "0.7.0", kind="rollback", app="nutrition-api")
    found = rollbacks_since(repo, app=APP, environment="dev", since=before)
    assert [sha for sha, _ in found] == [rb]
    assert rollbacks_since(repo, app=APP, environment="dev", since=datetime.now(UTC) + timedelta(seconds=5)) == []
