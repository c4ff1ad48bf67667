"""The old way and the new way side by side, from the moment the image exists (staging).

    .venv/bin/python bench/bench_old_way.py [--new-runs N] [--no-revert]

Images for every tag used are built beforehand with the right APP_VERSION and pushed, so both ways
start from "the image is in the registry":

- old way (the seed's CI job): `sed -i` of the tag line in values-staging.yaml in a clone of the
  sandbox's GitOps remote, `git commit`, `git push`, then nothing but Argo CD's own Git poll (the
  sandbox's emulator runs at Argo CD's real default, 180 s; no refresh annotation is set) until the
  app answers the new version on its health URL;
- new way: tasks.values.bump_image_tag + commit_and_push, tasks.argocd.request_refresh +
  wait_for_sync, tasks.probes.wait_for_rollout + probe_health (what the deploy flow runs after push).

And the seed's time to restore: a bad tag is committed the old way and deployed by a poll (the
refresh annotation stands in for that poll: it restarts the emulator's 180 s timer exactly as a poll
does), Argo CD reports it Degraded, then `git revert` of the bad commit is pushed at once (a human
reacting in zero seconds, the seed's best case) and Argo CD's next poll brings the good version back.
Because the bad version was itself deployed by a poll, the revert always waits for the rest of that
poll's cycle: about the full interval, not half of it.

One old-way sample per run is what fits the 15-minute budget: the poll phase at the push is random,
so besides the measured figure the expected value (interval/2 + what follows the poll) is reported.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import common
from common import (
    Ctx,
    build_sample_image,
    fmt,
    health,
    ratio,
    save,
    say,
    summarize,
    wait_for_version,
)

ENV = "staging"
INTERVAL_S = 180.0
# Work on the shared machine that would disturb another measurement holds this lock; idle waits do not.
MEASURE_LOCK = threading.RLock()


def _git(cwd: Path, *args: str) -> str:
    res = subprocess.run(["git", "-c", "user.name=ci", "-c", "user.email=ci@example.com", *args], cwd=cwd,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {res.stderr.strip()}")
    return res.stdout.strip()


def _push_like_a_human(clone: Path, branch: str) -> int:
    """`git push`; on a rejection (a dev deploy landed meanwhile) `git pull --rebase` and push again."""
    for attempt in range(1, 6):
        res = subprocess.run(["git", "push", "-q", "origin", f"HEAD:{branch}"], cwd=clone, capture_output=True,
                             text=True)
        if res.returncode == 0:
            return attempt
        _git(clone, "pull", "-q", "--rebase", "origin", branch)
    raise RuntimeError("git push kept being rejected")


def _application(ctx: Ctx) -> dict[str, Any]:
    from tasks.argocd import get_application

    env = ctx.env(ENV)
    return get_application(env.application, namespace=env.argocd_namespace)


def _sync_seen(app: dict[str, Any], sha: str) -> bool:
    st = app.get("status") or {}
    op = st.get("operationState") or {}
    revs = [((op.get("operation") or {}).get("sync") or {}).get("revision"),
            (op.get("syncResult") or {}).get("revision"), (st.get("sync") or {}).get("revision")]
    return sha in revs


def old_way_once(ctx: Ctx, clone: Path, tag: str, timeout: float = INTERVAL_S * 1.2 + 60) -> dict[str, Any]:
    env = ctx.env(ENV)
    branch = ctx.app.gitops_branch
    values = clone / ctx.app.values_path(ENV)
    _git(clone, "pull", "-q", "--rebase", "origin", branch)
    t0 = time.monotonic()
    # The seed's CI step, verbatim in spirit: rewrite the tag line with sed.
    subprocess.run(["sed", "-i", "-E", f's/^(  tag: ).*/\\1"{tag}"/', str(values)], check=True)
    _git(clone, "commit", "-q", "-am", f"ci: deploy {tag} to {ENV}")
    attempts = _push_like_a_human(clone, branch)
    sha = _git(clone, "rev-parse", "HEAD")
    t_pushed = time.monotonic()
    t_poll = t_answer = None
    while time.monotonic() - t0 < timeout:
        if t_poll is None:
            try:
                if _sync_seen(_application(ctx), sha):
                    t_poll = time.monotonic()
            except Exception:  # noqa: BLE001 - a failed status read only delays the observation
                pass
        code, version = health(env.health_url)
        if code == 200 and version == tag:
            t_answer = time.monotonic()
            break
        time.sleep(0.2)
    if t_answer is None:
        raise TimeoutError(f"old way: {env.health_url} did not answer {tag} within {timeout:.0f} s")
    t_poll = t_poll or t_answer
    return {"tag": tag, "commit": sha, "push_attempts": attempts, "total_s": round(t_answer - t0, 3),
            "edit_commit_push_s": round(t_pushed - t0, 3), "poll_wait_s": round(t_poll - t_pushed, 3),
            "after_poll_s": round(t_answer - t_poll, 3)}


def new_way_once(ctx: Ctx, workdir: Path, tag: str) -> dict[str, Any]:
    from tasks.argocd import request_refresh, wait_for_sync
    from tasks.gitops import checkout, commit_and_push
    from tasks.probes import probe_health, wait_for_rollout
    from tasks.values import bump_image_tag

    env = ctx.env(ENV)
    a = ctx.app
    repo = checkout(a.gitops_repo, a.gitops_branch, workdir)
    values = workdir / a.values_path(ENV)
    marks: dict[str, float] = {}
    t0 = time.monotonic()
    bump_image_tag(values, tag)
    commit = commit_and_push(repo, [a.values_path(ENV)], f"bench: new way {tag} to {ENV}", branch=a.gitops_branch)
    marks["bump_commit_push_s"] = time.monotonic() - t0
    request_refresh(env.application, namespace=env.argocd_namespace)
    wait_for_sync(env.application, commit.sha, timeout=120, namespace=env.argocd_namespace)
    marks["sync_s"] = time.monotonic() - t0 - marks["bump_commit_push_s"]
    wait_for_rollout(env.deployment, env.namespace, timeout=60)
    marks["rollout_s"] = time.monotonic() - t0 - marks["bump_commit_push_s"] - marks["sync_s"]
    probe_health(env.health_url, expect_version=tag, timeout=60)
    total = time.monotonic() - t0
    marks["health_s"] = total - marks["bump_commit_push_s"] - marks["sync_s"] - marks["rollout_s"]
    return {"tag": tag, "commit": commit.sha, "total_s": round(total, 3), **{k: round(v, 3) for k, v in marks.items()}}


def seed_revert_once(ctx: Ctx, clone: Path, bad_tag: str, good_tag: str,
                     timeout: float = INTERVAL_S * 1.2 + 60) -> dict[str, Any]:
    """A bad tag deployed by a poll, then `git revert` + the next poll: the seed's time to restore."""
    from tasks.argocd import request_refresh, sync_verdict
    from tasks.argocd import summarize as app_summary

    env = ctx.env(ENV)
    branch = ctx.app.gitops_branch
    values = clone / ctx.app.values_path(ENV)
    with MEASURE_LOCK:
        _git(clone, "pull", "-q", "--rebase", "origin", branch)
        subprocess.run(["sed", "-i", "-E", f's/^(  tag: ).*/\\1"{bad_tag}"/', str(values)], check=True)
        _git(clone, "commit", "-q", "-am", f"ci: deploy {bad_tag} to {ENV}")
        _push_like_a_human(clone, branch)
        bad_sha = _git(clone, "rev-parse", "HEAD")
        # Stands in for the poll that picked the bad commit up (same timer restart as a poll).
        request_refresh(env.application, namespace=env.argocd_namespace)
        t_bad = time.monotonic()
        while True:
            s = app_summary(_application(ctx))
            if s.sync_revision == bad_sha and s.health_status in ("Degraded", "Missing"):
                break
            if time.monotonic() - t_bad > 90:
                raise TimeoutError(f"the bad release never showed Degraded (last {s.health_status})")
            time.sleep(0.2)
        t_detect = time.monotonic()
    _git(clone, "revert", "--no-edit", bad_sha)
    _push_like_a_human(clone, branch)
    revert_sha = _git(clone, "rev-parse", "HEAD")
    t_reverted = time.monotonic()
    served_bad = False
    t_synced = None
    answers: dict[str, float] = {}
    while True:
        code, version = health(env.health_url)
        answers.setdefault(f"{code} {version}", round(time.monotonic() - t_reverted, 2))
        served_bad = served_bad or (code == 200 and version == bad_tag)
        app = _application(ctx)
        if t_synced is None and sync_verdict(app, revert_sha).state == "done":
            t_synced = time.monotonic()
        if t_synced is not None and code == 200 and version == good_tag:
            break
        if time.monotonic() - t_reverted > timeout:
            raise TimeoutError(f"the revert was not synced within {timeout:.0f} s")
        time.sleep(0.2)
    t_restored = time.monotonic()
    return {"bad_tag": bad_tag, "good_tag": good_tag, "bad_commit": bad_sha, "revert_commit": revert_sha,
            "bad_deploy_to_degraded_s": round(t_detect - t_bad, 3),
            "revert_push_to_restored_s": round(t_restored - t_reverted, 3),
            "revert_push_to_synced_healthy_s": round(t_synced - t_reverted, 3) if t_synced else None,
            "health_answers_first_seen_s": answers,
            "degraded_to_restored_s": round(t_restored - t_detect, 3), "bad_version_answered": served_bad}


def prepare(ctx: Ctx, new_runs: int, revert: bool) -> dict[str, Any]:
    rid = ctx.run_id
    tags = {"old": f"bench-{rid}-old", "new": [f"bench-{rid}-new{i}" for i in range(new_runs)],
            "bad": f"bench-{rid}-bad"}
    for t in [tags["old"], *tags["new"]]:
        build_sample_image(t)
    if revert:
        build_sample_image(tags["bad"], healthy=False)
    return tags


def run(ctx: Ctx, new_runs: int, revert: bool, tags: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole comparison; meant to run in a thread beside the other benchmarks (staging only)."""
    tags = tags or prepare(ctx, new_runs, revert)
    env = ctx.env(ENV)
    out: dict[str, Any] = {"environment": ENV, "interval_s": INTERVAL_S}
    with tempfile.TemporaryDirectory(prefix="bench-oldway-") as tmp:
        clone = Path(tmp) / "gitops-ci"
        subprocess.run(["git", "clone", "-q", ctx.app.gitops_repo, str(clone)], check=True)
        say(f"old way: sed + commit + push {tags['old']} to {ENV}, then wait for Argo CD's 180 s poll ...")
        old = old_way_once(ctx, clone, tags["old"])
        say(f"old way: {old['total_s']:.1f} s (edit+commit+push {old['edit_commit_push_s']:.2f} s, "
            f"poll wait {old['poll_wait_s']:.1f} s, after the poll {old['after_poll_s']:.2f} s)")
        out["old_way"] = old
        news = []
        for i, tag in enumerate(tags["new"]):
            with MEASURE_LOCK:
                r = new_way_once(ctx, Path(tmp) / "gitops-new", tag)
            say(f"new way {i + 1}/{len(tags['new'])}: {r['total_s']:.2f} s (bump+commit+push "
                f"{r['bump_commit_push_s']:.2f}, sync {r['sync_s']:.2f}, rollout {r['rollout_s']:.2f}, "
                f"health {r['health_s']:.2f})")
            news.append(r)
        out["new_way_runs"] = news
        out["new_way_s"] = summarize(r["total_s"] for r in news)
        new_med = out["new_way_s"].get("median")
        out["old_way_s"] = old["total_s"]
        out["old_way_expected_s"] = round(old["edit_commit_push_s"] + INTERVAL_S / 2 + old["after_poll_s"], 3)
        out["old_way_worst_s"] = round(old["edit_commit_push_s"] + INTERVAL_S + old["after_poll_s"], 3)
        out["ratio_measured"] = ratio(old["total_s"], new_med)
        out["ratio_expected"] = ratio(out["old_way_expected_s"], new_med)
        say(f"old way {old['total_s']:.1f} s (expected {out['old_way_expected_s']:.1f} s over a random poll phase) "
            f"vs new way {fmt(out['new_way_s'])}: ×{out['ratio_measured']} measured, ×{out['ratio_expected']} expected")
        good = news[-1]["tag"] if news else tags["old"]
        if revert:
            say(f"seed's restore: bad tag {tags['bad']} deployed by a poll, then git revert + wait for the "
                "next poll ...")
            rv = seed_revert_once(ctx, clone, tags["bad"], good)
            say(f"seed's restore: Degraded after {rv['bad_deploy_to_degraded_s']:.1f} s; revert pushed → restored "
                f"{rv['revert_push_to_restored_s']:.1f} s")
            out["seed_restore"] = rv
        else:
            # The revert is a commit + push + the next poll: the old-way path measured above. The bad
            # release was deployed by a poll, so the revert waits the rest of that cycle (≈ the interval).
            out["seed_restore"] = {"estimated_from_old_way": True,
                                   "revert_push_to_restored_s": round(INTERVAL_S + old["after_poll_s"], 3)}
        code, version = health(env.health_url)
        out["staging_serving_at_end"] = f"{code} {version}"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-runs", type=int, default=3)
    p.add_argument("--no-revert", action="store_true", help="skip the seed's git-revert restore (one poll less)")
    p.add_argument("--real", action="store_true", help="on the real tier (delivery up --real)")
    a = p.parse_args()
    ctx = common.ensure_stack(real=a.real)
    out = run(ctx, a.new_runs, not a.no_revert)
    out["machine"] = common.machine()
    out["tier"] = "real" if a.real else "emulators"
    say(f"wrote {save('old_way' + ('_real' if a.real else ''), out)}")


if __name__ == "__main__":
    main()

__all__ = ["MEASURE_LOCK", "new_way_once", "old_way_once", "prepare", "run", "seed_revert_once", "wait_for_version"]
