"""GitHub deploy feedback: commit statuses, a GitHub Deployment per run and its deployment statuses,
on the app's source repository, through GitHub's REST API (github.com or GitHub Enterprise).

How a flow calls it (deploy; promotion the same way with `kind="promote"`):

    fb = github.DeployFeedback.start(app=a, environment=env.name, sha=source_sha, tag=tag,
                                     run_url=runtime.flow_run.ui_url, health_url=env.health_url)
        # creates the Deployment (state queued) and sets the aggregate `delivery/<env>` to pending
    fb.begin()                                   # once the lock is held: the Deployment goes in_progress
    fb.stage("build", "pending")                 # as each stage starts ... and as it ends:
    fb.stage("build", "success", "image already in the registry")
        # stages: build, push, commit (the report's "bump-commit-push" is accepted too), argocd-sync,
        # rollout, health; a failing stage: fb.stage("health", "failure", str(error))
    fb.finish(True, f"{tag} serves in {env.name}")   # or fb.finish(False, reason): aggregate and Deployment
    fb.cancel("superseded by 1a2b3c4")           # newest-wins: Deployment inactive, aggregate error
    # fb.notes: what GitHub refused or could not take, one line each, for the run's report

A rollback (its own run, or the deploy's automatic one) has its own Deployment and marks the bad one
`failure`; then the same `stage`/`finish` calls:

    rb = github.rollback_feedback(app=a, environment=env.name, to_tag=target, sha=None,  # None: looked up
                                  run_url=..., health_url=env.health_url, bad_tag=current,
                                  bad_deployment_id=fb.deployment_id, reason=reason)

Every public function returns (never raises): GitHub being down or refusing a request never fails a
deploy. An outage (connection error, timeout, 5xx, 429 or a rate limit) is retried within
`github_attempts` and `github_retry_seconds`, honouring Retry-After inside that bound, then given up
with a note; a 4xx is noted at once. Without a token every function does nothing (logged once).

The token is read from `DELIVERY_GITHUB_TOKEN` or the Prefect `Secret` block named by
`DELIVERY_GITHUB_TOKEN_BLOCK`, registered for redaction, and sent only as the `Authorization` header.
The tasks at the bottom keep no result (`persist_result=False`): a persisted `DeployFeedback` would
write the token to the result store.
"""

from __future__ import annotations

import email.utils
import functools
import json
import random
import re
import ssl
import time
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import SecretStr

from delivery.config import App
from delivery.errors import GitHubError
from delivery.log import get_logger
from delivery.redact import redact, register_secret
from delivery.settings import Settings, get_settings

API_VERSION = "2022-11-28"
USER_AGENT = "delivery-pipeline"
STAGES = ("build", "push", "commit", "argocd-sync", "rollout", "health")
# The deploy report's stage names that differ from the status contexts.
_STAGE_ALIASES = {"bump-commit-push": "commit"}
COMMIT_STATES = ("pending", "success", "failure", "error")
DEPLOYMENT_STATES = ("queued", "in_progress", "pending", "success", "failure", "error", "inactive")
# GitHub's documented limit for status descriptions.
DESCRIPTION_MAX = 140

_SHA_RE = re.compile(r"[0-9a-fA-F]{7,64}")
_REPO_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})/[A-Za-z0-9._-]{1,100}")
_STAGE_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,40}")
_BACKOFF_BASE = 0.5
_BACKOFF_CAP = 8.0
# GitHub asks for at least a minute after a secondary rate limit that names no Retry-After.
_SECONDARY_LIMIT_WAIT = 60.0

_said_off = False


@dataclass
class GitHubReport:
    """What one call (or a whole feedback) achieved. `ok` is False when something was not sent;
    `notes` say what and why, ready for the deploy report. `skipped`: feedback is off (no token)."""

    ok: bool = True
    notes: list[str] = field(default_factory=list)
    skipped: bool = False
    # The call gave up on an outage (no answer, 5xx, 429, rate limit) rather than on a refusal.
    outage: bool = False
    status: int | None = None
    attempts: int = 0
    deployment_id: int | None = None
    data: Any = None

    def fail(self, note: str) -> GitHubReport:
        self.ok = False
        self.notes.append(redact(note))
        return self


@dataclass(frozen=True)
class GitHubTarget:
    """Where feedback goes and its bounds. The token is a `SecretStr`: printing this shows `**********`."""

    repository: str
    token: SecretStr = field(repr=False)
    api_url: str = "https://api.github.com"
    timeout: float = 10.0
    attempts: int = 4
    seconds: float = 30.0

    @property
    def repo_url(self) -> str:
        return f"{self.api_url.rstrip('/')}/repos/{self.repository}"


# ---------------------------------------------------------------------------------------------
# Configuration: token, repository, target
# ---------------------------------------------------------------------------------------------

def load_github_token(settings: Settings) -> tuple[str | None, str | None]:
    """(token, None), or (None, why not) when a configured source is unusable, or (None, None) when
    no token is configured at all. The token is registered for redaction before it goes anywhere."""
    if settings.github_token is not None:
        value = settings.github_token.get_secret_value().strip()
        if value:
            register_secret(value)
            return value, None
    if settings.github_token_block:
        from prefect.blocks.system import Secret

        name = settings.github_token_block
        try:
            value = Secret.load(name).get()
        except Exception as e:
            # The exception text may quote the block's content: only its type goes into the note.
            return None, f"GitHub feedback off: cannot load Prefect Secret block {name!r} ({type(e).__name__})"
        if not isinstance(value, str) or not value.strip():
            return None, f"GitHub feedback off: Prefect Secret block {name!r} holds no usable string"
        value = value.strip()
        register_secret(value)
        return value, None
    return None, None


def _web_host(api_url: str) -> str:
    """The host people clone from: github.com for api.github.com, the same host for Enterprise."""
    host = (urlsplit(api_url).hostname or "").lower()
    return "github.com" if host == "api.github.com" else host


def github_repository_from_url(url: str, api_url: str = "https://api.github.com") -> str | None:
    """`owner/name` of a clone URL on the GitHub that `api_url` serves (https, ssh or scp-like), else None."""
    text = url.strip()
    host = _web_host(api_url)
    if not host or not text:
        return None
    m = re.fullmatch(r"(?:[\w.+-]+@)?([^:/\s]+):(?!\d+/)([^\s]+)", text)  # scp-like: git@github.com:org/x.git
    if "://" in text:
        parts = urlsplit(text)
        url_host, path = (parts.hostname or "").lower(), parts.path
    elif m:
        url_host, path = m.group(1).lower(), m.group(2)
    else:
        return None
    if url_host != host:
        return None
    # Enterprise serves clones at the host root too; a "/api/v3" style prefix is only on the API.
    repo = path.strip("/").removesuffix(".git")
    return repo if _REPO_RE.fullmatch(repo) and ".." not in repo else None


def github_repository_for(app: App | None, settings: Settings) -> str | None:
    """The repository that gets an app's feedback: the app's `github_repository`, else the
    `github_repository` setting, else the one its `source_repo` URL names on that GitHub."""
    if app is not None and app.github_repository:
        return app.github_repository
    if settings.github_repository:
        return settings.github_repository.strip()
    if app is not None:
        return github_repository_from_url(app.source_repo, settings.github_api_url)
    return None


def _say_off_once(why: str) -> None:
    global _said_off
    if not _said_off:
        _said_off = True
        get_logger().info("GitHub feedback is off: %s", why)


def github_target(app: App | None = None, *, settings: Settings | None = None,
                  repository: str | None = None) -> tuple[GitHubTarget | None, list[str]]:
    """The target for `app` (or an explicit `repository`), and notes for the report when feedback
    was configured but cannot work. No token at all: (None, []), said once in the log."""
    settings = settings or get_settings()
    token, why = load_github_token(settings)
    if token is None:
        if why:
            get_logger().warning("%s", why)
            return None, [why]
        _say_off_once("no DELIVERY_GITHUB_TOKEN or DELIVERY_GITHUB_TOKEN_BLOCK")
        return None, []
    repo = repository or github_repository_for(app, settings)
    if not repo:
        name = app.name if app is not None else "?"
        note = (f"GitHub feedback off for {name}: no repository (set github_repository in the app's config "
                "or DELIVERY_GITHUB_REPOSITORY, or use a GitHub source_repo URL)")
        get_logger().warning("%s", note)
        return None, [note]
    if not _REPO_RE.fullmatch(repo) or ".." in repo:
        note = f"GitHub feedback off: {repo!r} is not an owner/name repository"
        get_logger().warning("%s", note)
        return None, [redact(note)]
    api_url = settings.github_api_url.strip().rstrip("/")
    parts = urlsplit(api_url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        # Credentials in the URL would travel as basic auth and show in every error that quotes it.
        note = f"GitHub feedback off: github_api_url {api_url!r} must be an http(s) URL without credentials"
        get_logger().warning("%s", note)
        return None, [redact(note)]
    return GitHubTarget(repository=repo, token=SecretStr(token), api_url=api_url,
                        timeout=settings.github_timeout_seconds, attempts=settings.github_attempts,
                        seconds=settings.github_retry_seconds), []


# ---------------------------------------------------------------------------------------------
# One bounded request
# ---------------------------------------------------------------------------------------------

def _retry_after(resp: httpx.Response) -> float | None:
    """Seconds GitHub asks us to wait: `Retry-After` (seconds or an HTTP date), else the rate
    limit's reset time when none is left, else None."""
    value = resp.headers.get("retry-after")
    if value:
        value = value.strip()
        if value.isdigit():
            return float(value)
        try:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
        except (TypeError, ValueError):
            return None
    if resp.headers.get("x-ratelimit-remaining") == "0" and (reset := resp.headers.get("x-ratelimit-reset")):
        try:
            return max(0.0, float(reset) - time.time())
        except ValueError:
            return None
    return None


def _error_text(resp: httpx.Response) -> str:
    """`HTTP 422 Validation Failed: No ref found for: abc` from GitHub's error body."""
    text = f"HTTP {resp.status_code}"
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        if body.get("message"):
            text += f" {body['message']}"
        details = []
        for err in body.get("errors") or []:
            if isinstance(err, dict):
                details.append(str(err.get("message") or " ".join(
                    str(err[k]) for k in ("resource", "field", "code") if err.get(k))))
            else:
                details.append(str(err))
        if details:
            text += ": " + "; ".join(details)
    elif resp.reason_phrase:
        text += f" {resp.reason_phrase}"
    return redact(text[:300])


def _classify(resp: httpx.Response) -> GitHubError:
    code = resp.status_code
    text = _error_text(resp)
    wait = _retry_after(resp)
    rate_limited = code == 429 or (code == 403 and (wait is not None or "rate limit" in text.lower()))
    if rate_limited and wait is None:
        wait = _SECONDARY_LIMIT_WAIT if code == 403 else None
    return GitHubError(text, status=code, transient=code >= 500 or rate_limited, retry_after=wait)


def _request_once(client: httpx.Client, method: str, url: str, *, headers: dict[str, str], body: Any,
                  params: dict[str, Any] | None, timeout: float) -> httpx.Response:
    try:
        resp = client.request(method, url, headers=headers, json=body, params=params, timeout=timeout)
    except httpx.TimeoutException as e:
        raise GitHubError(f"no answer within {timeout:.1f} s ({type(e).__name__})", transient=True) from e
    except httpx.TransportError as e:
        raise GitHubError(redact(f"unreachable: {type(e).__name__}: {e}"), transient=True) from e
    if resp.status_code >= 300:
        raise _classify(resp)
    return resp


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """Reading the CA bundle costs ~30 ms: once per process, not per call. Honours SSL_CERT_FILE and
    SSL_CERT_DIR (a GitHub Enterprise behind a private CA)."""
    return httpx.create_ssl_context()


def call_github(target: GitHubTarget, method: str, path: str, *, what: str, body: Any = None,
                params: dict[str, Any] | None = None, not_done: str = "not sent") -> GitHubReport:
    """One REST call under `target.repo_url` + `path`, retried on an outage within the target's bounds.
    Never raises: a failure is a report with `ok=False` and a note `GitHub <what> not sent: <why>`."""
    log = get_logger()
    report = GitHubReport()
    url = target.repo_url + path
    headers = {
        "Authorization": f"Bearer {target.token.get_secret_value()}",
        "Accept": "application/vnd.github+json",
        "X-GitHub-Api-Version": API_VERSION,
        "User-Agent": USER_AGENT,
    }
    started = time.monotonic()
    deadline = started + target.seconds
    try:
        # httpx drops the Authorization header itself if GitHub redirects to another host.
        with httpx.Client(verify=_tls_context(), follow_redirects=True) as client:
            while True:
                report.attempts += 1
                remaining = deadline - time.monotonic()
                try:
                    resp = _request_once(client, method, url, headers=headers, body=body, params=params,
                                         timeout=max(0.1, min(target.timeout, remaining)))
                except GitHubError as e:
                    report.status = e.status
                    elapsed = time.monotonic() - started
                    if not e.transient:
                        return report.fail(f"GitHub {what} {not_done}: {e.message} (not retried)")
                    remaining = deadline - time.monotonic()
                    if e.retry_after is not None:
                        delay = e.retry_after
                    else:
                        delay = min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** (report.attempts - 1))
                        delay *= random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not crypto
                    if report.attempts >= target.attempts or delay >= remaining:
                        report.outage = True
                        asked = (f"; GitHub asked to wait {e.retry_after:.0f} s"
                                 if e.retry_after is not None and e.retry_after >= remaining else "")
                        return report.fail(
                            f"GitHub {what} {not_done}: gave up after {report.attempts} attempt(s) in {elapsed:.1f} s "
                            f"(bound: {target.attempts} attempts, {target.seconds:g} s){asked}; "
                            f"last error: {e.message}")
                    log.warning("GitHub %s: attempt %d/%d failed (%s); retrying in %.1f s",
                                what, report.attempts, target.attempts, e.message, delay)
                    time.sleep(delay)
                    continue
                report.status = resp.status_code
                try:
                    report.data = resp.json() if resp.content else None
                except ValueError:
                    report.data = None
                log.debug("GitHub %s: HTTP %d after %d attempt(s)", what, resp.status_code, report.attempts)
                return report
    except Exception as e:  # a bug or an odd environment still must not fail the deploy
        return report.fail(f"GitHub {what} {not_done}: {type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------------
# The API calls
# ---------------------------------------------------------------------------------------------

def _short_description(text: str) -> str:
    text = redact(" ".join(str(text).split()))
    return text if len(text) <= DESCRIPTION_MAX else text[: DESCRIPTION_MAX - 1] + "…"


def _off() -> GitHubReport:
    _say_off_once("no target (no token configured)")
    return GitHubReport(skipped=True)


def create_commit_status(target: GitHubTarget | None, sha: str, *, context: str, state: str,
                         description: str = "", target_url: str | None = None) -> GitHubReport:
    """POST /repos/{owner}/{repo}/statuses/{sha}: `state` is pending, success, failure or error."""
    if target is None:
        return _off()
    what = f"commit status {context} ({state})"
    if state not in COMMIT_STATES:
        return GitHubReport().fail(f"GitHub {what} not sent: state must be one of {', '.join(COMMIT_STATES)}")
    if not _SHA_RE.fullmatch(sha or ""):
        return GitHubReport().fail(f"GitHub {what} not sent: {sha!r} is not a commit SHA")
    body: dict[str, Any] = {"state": state, "context": context, "description": _short_description(description)}
    if target_url:
        body["target_url"] = target_url
    return call_github(target, "POST", f"/statuses/{sha}", what=what, body=body)


def create_deployment(target: GitHubTarget | None, *, sha: str, environment: str, app: str, tag: str,
                      kind: str = "deploy", description: str = "", run_url: str | None = None) -> GitHubReport:
    """POST /repos/{owner}/{repo}/deployments for `sha` in `environment`; `deployment_id` on success.
    No auto-merge and no required contexts: the pipeline has already decided to deploy."""
    if target is None:
        return _off()
    what = f"Deployment for {environment}"
    if not _SHA_RE.fullmatch(sha or ""):
        return GitHubReport().fail(f"GitHub {what} not created: {sha!r} is not a commit SHA")
    payload: dict[str, Any] = {"app": app, "tag": tag, "kind": kind}
    if run_url:
        payload["run_url"] = run_url
    body = {
        "ref": sha,
        "task": "deploy" if kind == "deploy" else f"deploy:{kind}",
        "environment": environment,
        "auto_merge": False,
        "required_contexts": [],
        "payload": payload,
        "description": _short_description(description or f"{kind} {app}:{tag} to {environment}"),
    }
    report = call_github(target, "POST", "/deployments", what=what, body=body, not_done="not created")
    if report.ok:
        deployment_id = report.data.get("id") if isinstance(report.data, dict) else None
        if not isinstance(deployment_id, int):
            # A 202 ("auto-merged") carries no Deployment; auto_merge is off, so this is unexpected.
            return report.fail(f"GitHub {what} not created: HTTP {report.status} without a Deployment id")
        report.deployment_id = deployment_id
    return report


def create_deployment_status(target: GitHubTarget | None, deployment_id: int, *, state: str,
                             description: str = "", log_url: str | None = None,
                             environment_url: str | None = None) -> GitHubReport:
    """POST /repos/{owner}/{repo}/deployments/{id}/statuses: queued, in_progress, success, failure, ..."""
    if target is None:
        return _off()
    what = f"deployment status {state} (Deployment {deployment_id})"
    if state not in DEPLOYMENT_STATES:
        return GitHubReport().fail(f"GitHub {what} not sent: state must be one of {', '.join(DEPLOYMENT_STATES)}")
    body: dict[str, Any] = {"state": state, "description": _short_description(description)}
    if log_url:
        body["log_url"] = log_url
    if environment_url:
        body["environment_url"] = environment_url
    report = call_github(target, "POST", f"/deployments/{int(deployment_id)}/statuses", what=what, body=body)
    report.deployment_id = deployment_id
    return report


def _payload(deployment: dict[str, Any]) -> dict[str, Any]:
    payload = deployment.get("payload")
    if isinstance(payload, str):
        try:
            payload = json.loads(payload) if payload else {}
        except ValueError:
            payload = {}
    return payload if isinstance(payload, dict) else {}


def find_deployment(target: GitHubTarget | None, *, environment: str, app: str, tag: str | None = None,
                    sha: str | None = None, exclude: set[int] | frozenset[int] = frozenset()) -> GitHubReport:
    """The newest Deployment this pipeline created for `app` in `environment` (with `tag` and/or `sha`
    when given): `deployment_id` and `data` (the Deployment), or `deployment_id=None` when none matches."""
    if target is None:
        return _off()
    params: dict[str, Any] = {"environment": environment, "per_page": 100}
    if sha:
        params["sha"] = sha
    report = call_github(target, "GET", "/deployments", what=f"Deployment lookup in {environment}", params=params,
                         not_done="failed")
    if not report.ok:
        return report
    for dep in report.data if isinstance(report.data, list) else []:
        if not isinstance(dep, dict) or dep.get("id") in exclude:
            continue
        p = _payload(dep)
        if p.get("app") == app and (tag is None or p.get("tag") == tag) and (sha is None or dep.get("sha") == sha):
            report.deployment_id = dep.get("id")
            report.data = dep
            return report
    report.data = None
    return report


# ---------------------------------------------------------------------------------------------
# One run's feedback
# ---------------------------------------------------------------------------------------------

def _context(name: str) -> str:
    name = _STAGE_ALIASES.get(name, name)
    return name if name.startswith("delivery/") else f"delivery/{name}"


class DeployFeedback:
    """Everything GitHub shows about one deploy, rollback or promotion run. Created by `start` (or
    `rollback_feedback`); each method sends what it can, adds notes for what it could not, and returns
    that call's `GitHubReport`. Without a target every method does nothing."""

    def __init__(self, target: GitHubTarget | None, *, app: str, environment: str, sha: str, tag: str = "",
                 run_url: str | None = None, health_url: str | None = None, kind: str = "deploy",
                 notes: list[str] | None = None) -> None:
        self.target = target
        self.app = app
        self.environment = environment
        self.sha = sha
        self.tag = tag
        self.run_url = run_url or None
        self.health_url = health_url or None
        self.kind = kind
        self.notes: list[str] = list(notes or [])
        self.deployment_id: int | None = None
        self.deployment_state: str | None = None
        self.finished = False
        self._stages: dict[str, str] = {}
        # After GitHub has been down for a whole bound, later calls make one attempt each: a deploy
        # must not wait out the bound again for every status while GitHub is down.
        self._outage = False
        # A 401 holds for the whole run: one note, then silence.
        self._refused: str | None = None

    def __repr__(self) -> str:
        return (f"DeployFeedback({self.kind} {self.app}:{self.tag} to {self.environment} at {self.sha[:12]}, "
                f"deployment {self.deployment_id}, {len(self.notes)} note(s))")

    @property
    def enabled(self) -> bool:
        return self.target is not None

    @property
    def ok(self) -> bool:
        return not self.notes

    @property
    def aggregate_context(self) -> str:
        return f"delivery/{self.environment}"

    @classmethod
    def start(cls, *, app: App | str, environment: str, sha: str, tag: str = "", run_url: str | None = None,
              health_url: str | None = None, kind: str = "deploy", description: str = "",
              settings: Settings | None = None, repository: str | None = None,
              target: GitHubTarget | None = None) -> DeployFeedback:
        """Resolve the target, create the run's Deployment (queued) and set the aggregate to pending."""
        notes: list[str] = []
        if target is None:
            target, notes = github_target(app if isinstance(app, App) else None, settings=settings,
                                          repository=repository)
        name = app.name if isinstance(app, App) else app
        fb = cls(target, app=name, environment=environment, sha=sha, tag=tag, run_url=run_url,
                 health_url=health_url, kind=kind, notes=notes)
        fb.open(description)
        return fb

    # -- the calls, with the run's outage and refusal memory ----------------------------------

    def _target(self) -> GitHubTarget | None:
        if self.target is None or self._refused:
            return None
        return replace(self.target, attempts=1) if self._outage else self.target

    def _record(self, report: GitHubReport) -> GitHubReport:
        if report.skipped:
            return report
        if report.ok:
            self._outage = False
            return report
        self.notes.extend(report.notes)
        if report.status == 401:
            self._refused = f"HTTP {report.status}"
            self.notes.append("GitHub feedback stopped for this run: the token was refused (HTTP 401)")
        elif report.outage:
            self._outage = True
        return report

    def _skipped(self) -> GitHubReport:
        return GitHubReport(skipped=True)

    def open(self, description: str = "") -> GitHubReport:
        """Create the Deployment (queued) and the pending aggregate; `start` calls it."""
        target = self._target()
        if target is None:
            return self._skipped()
        text = description or f"{self.kind} {self.app}:{self.tag or self.sha[:12]} to {self.environment}"
        result = self._record(create_deployment(target, sha=self.sha, environment=self.environment, app=self.app,
                                                tag=self.tag, kind=self.kind, description=text,
                                                run_url=self.run_url))
        self.deployment_id = result.deployment_id
        if self.deployment_id is not None:
            self._deployment_status("queued", f"{text}: queued")
        self._commit_status(self.aggregate_context, "pending", f"{text}: started")
        return result

    def _commit_status(self, context: str, state: str, description: str) -> GitHubReport:
        target = self._target()
        # A rollback whose commit is unknown has said so once already; no note per status.
        if target is None or not self.sha:
            return self._skipped()
        return self._record(create_commit_status(target, self.sha, context=context, state=state,
                                                 description=description, target_url=self.run_url))

    def _deployment_status(self, state: str, description: str) -> GitHubReport:
        target = self._target()
        if target is None or self.deployment_id is None:
            return self._skipped()
        result = self._record(create_deployment_status(target, self.deployment_id, state=state,
                                                       description=description, log_url=self.run_url,
                                                       environment_url=self.health_url))
        if result.ok:
            self.deployment_state = state
        return result

    def begin(self, description: str = "") -> GitHubReport:
        """The run's work starts (the lock is held): the Deployment goes in_progress."""
        if self.deployment_state == "in_progress" or self.finished:
            return self._skipped()
        return self._deployment_status("in_progress", description or f"{self.kind} {self.tag} running")

    def stage(self, name: str, state: str, description: str = "") -> GitHubReport:
        """A stage's commit status (`delivery/<stage>`): pending when it starts, success, failure or error."""
        context = _context(name)
        if not _STAGE_RE.fullmatch(context.removeprefix("delivery/")) or context == self.aggregate_context:
            result = GitHubReport().fail(f"GitHub commit status for stage {name!r} not sent: not a stage name")
            self.notes.extend(result.notes)
            return result
        if self._target() is None:
            return self._skipped()
        if self.deployment_state in (None, "queued") and self.deployment_id is not None and not self.finished:
            self.begin()
        defaults = {"pending": "running", "success": "done", "failure": "failed", "error": "did not finish"}
        text = description or f"{context.removeprefix('delivery/')} {defaults.get(state, state)}"
        result = self._commit_status(context, state, text)
        self._stages[context] = state
        return result

    def finish(self, success: bool, description: str = "") -> GitHubReport:
        """The run's outcome: the aggregate `delivery/<environment>` and the Deployment's final state.
        Stages left pending are closed (error when the run failed). Only the first call counts."""
        if self.finished:
            return self._skipped()
        if self._target() is None:
            self.finished = True
            return GitHubReport(skipped=True, ok=not self.notes, notes=list(self.notes))
        if success and self.deployment_state == "queued":
            self.begin()  # GitHub shows a success that never ran as odd; a failure may well never have started
        self.finished = True
        for context, state in list(self._stages.items()):
            if state == "pending":
                self.stage(context, "success" if success else "error",
                           "" if success else "the run ended before this stage finished")
        done = {"deploy": "deployed", "rollback": "rolled back to", "promote": "promoted"}.get(self.kind, self.kind)
        text = description or (f"{done} {self.tag} in {self.environment}" if success
                               else f"{self.kind} of {self.tag} to {self.environment} failed")
        state = "success" if success else "failure"
        self._commit_status(self.aggregate_context, state, text)
        self._deployment_status(state, text)
        return GitHubReport(ok=not self.notes, notes=list(self.notes), deployment_id=self.deployment_id)

    def cancel(self, description: str = "") -> GitHubReport:
        """The run was superseded or cancelled: the Deployment goes inactive and the aggregate says error."""
        if self.finished:
            return self._skipped()
        self.finished = True
        if self._target() is None:
            return GitHubReport(skipped=True, ok=not self.notes, notes=list(self.notes))
        text = description or f"{self.kind} of {self.tag} to {self.environment} cancelled"
        for context, state in list(self._stages.items()):
            if state == "pending":
                self.stage(context, "error", text)
        self._commit_status(self.aggregate_context, "error", text)
        self._deployment_status("inactive", text)
        return GitHubReport(ok=not self.notes, notes=list(self.notes), deployment_id=self.deployment_id)

    def mark_failed(self, deployment_id: int, description: str) -> GitHubReport:
        """Another run's Deployment gets `failure` (a rollback marks the bad deploy), linking this run."""
        target = self._target()
        if target is None:
            return self._skipped()
        return self._record(create_deployment_status(target, deployment_id, state="failure", description=description,
                                                     log_url=self.run_url, environment_url=self.health_url))


def rollback_feedback(*, app: App | str, environment: str, to_tag: str, sha: str | None = None,
                      run_url: str | None = None, health_url: str | None = None,
                      bad_deployment_id: int | None = None, bad_tag: str | None = None, reason: str = "",
                      settings: Settings | None = None, repository: str | None = None,
                      target: GitHubTarget | None = None) -> DeployFeedback:
    """Feedback for a rollback to `to_tag`: its own Deployment (for `sha`, the source commit of the
    good release; None: taken from that tag's earlier Deployment), and the bad deploy's Deployment
    (`bad_deployment_id`, else the newest one for `bad_tag`) marked `failure`. Returns the rollback's
    `DeployFeedback` for its stages and `finish`."""
    notes: list[str] = []
    if target is None:
        target, notes = github_target(app if isinstance(app, App) else None, settings=settings,
                                      repository=repository)
    name = app.name if isinstance(app, App) else app
    fb = DeployFeedback(target, app=name, environment=environment, sha=sha or "", tag=to_tag, run_url=run_url,
                        health_url=health_url, kind="rollback", notes=notes)
    if target is None:
        return fb
    why = f"rolled back to {to_tag}" + (f": {reason}" if reason else "")
    if not sha:
        found = fb._record(find_deployment(fb._target(), environment=environment, app=name, tag=to_tag))
        if found.deployment_id is not None and isinstance(found.data, dict):
            fb.sha = str(found.data.get("sha") or "")
    if fb.sha:
        fb.open(f"rollback to {to_tag} in {environment}")
    else:
        fb.notes.append(f"GitHub Deployment for the rollback to {to_tag} not created: "
                        "no source commit known for that tag")
    if bad_deployment_id is None and bad_tag:
        exclude = {fb.deployment_id} if fb.deployment_id is not None else set()
        found = fb._record(find_deployment(fb._target(), environment=environment, app=name, tag=bad_tag,
                                           exclude=exclude))
        bad_deployment_id = found.deployment_id
        if found.ok and bad_deployment_id is None:
            fb.notes.append(f"GitHub: no Deployment of {bad_tag} in {environment} to mark failed")
    if bad_deployment_id is not None:
        fb.mark_failed(bad_deployment_id, why)
    return fb


# ---------------------------------------------------------------------------------------------
# Prefect tasks (thin; no result kept: a DeployFeedback holds the token)
# ---------------------------------------------------------------------------------------------

@task(name="github-feedback-start", cache_policy=NO_CACHE, persist_result=False)
def start_feedback_task(app: App | str, environment: str, sha: str, tag: str = "", run_url: str | None = None,
                        health_url: str | None = None, kind: str = "deploy") -> DeployFeedback:
    return DeployFeedback.start(app=app, environment=environment, sha=sha, tag=tag, run_url=run_url,
                                health_url=health_url, kind=kind)


@task(name="github-feedback-finish", cache_policy=NO_CACHE, persist_result=False)
def finish_feedback_task(feedback: DeployFeedback, success: bool, description: str = "") -> GitHubReport:
    return feedback.finish(success, description)


@task(name="github-feedback-rollback", cache_policy=NO_CACHE, persist_result=False)
def rollback_feedback_task(app: App | str, environment: str, to_tag: str, sha: str | None = None,
                           run_url: str | None = None, health_url: str | None = None,
                           bad_deployment_id: int | None = None, bad_tag: str | None = None,
                           reason: str = "") -> DeployFeedback:
    return rollback_feedback(app=app, environment=environment, to_tag=to_tag, sha=sha, run_url=run_url,
                             health_url=health_url, bad_deployment_id=bad_deployment_id, bad_tag=bad_tag,
                             reason=reason)


__all__ = [
    "API_VERSION", "COMMIT_STATES", "DEPLOYMENT_STATES", "STAGES", "DeployFeedback", "GitHubReport",
    "GitHubTarget", "call_github", "create_commit_status", "create_deployment", "create_deployment_status",
    "find_deployment", "finish_feedback_task", "github_repository_for", "github_repository_from_url",
    "github_target", "load_github_token", "rollback_feedback", "rollback_feedback_task", "start_feedback_task",
]
