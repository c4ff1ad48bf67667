"""A fake GitHub REST API for the feedback tests: a real HTTP server on 127.0.0.1 (ephemeral port,
own thread) that checks every request against GitHub's published OpenAPI description (npm
`@octokit/openapi`, `api.github.com.json`, installed under .tools/ by scripts/setup.sh) with
`openapi-core`, and answers with bodies built from the same description's examples.

- A request the description does not allow (unknown path or method, bad body, missing required
  field, wrong enum value, bad parameter) is recorded in `violations` and answered 422 as GitHub
  would; the `fake_github` fixture fails the test at teardown if any violation is left.
- Every answer the fake builds is itself validated against the operation's response schema, so a
  drift between the fake and the description is a violation too.
- Faults: `outage(...)` (an HTTP status such as 503/429 with optional Retry-After), `hang(...)`
  (accept and never answer) and `drop(...)` (close without answering), for chosen operations and a
  number of requests; `unused_url()` gives an address where nothing listens (connection refused).
- `requests` records each request: method, path, query, headers without Authorization (only
  whether it carried the expected bearer token), body, operation and answer status.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from openapi_core import Config, OpenAPI
from openapi_core.templating.paths.finders import APICallPathFinder
from openapi_core.testing import MockRequest, MockResponse

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIR = PROJECT_ROOT / ".tools" / "npm" / "node_modules" / "@octokit" / "openapi"
# The plain (not dereferenced) description: 13 MB of JSON parse in about 0.3 s, and openapi-core
# resolves its $refs lazily; the dereferenced one is 73 MB and takes seconds just to parse.
SPEC_FILE = "generated/api.github.com.json"
SERVER = "https://api.github.com"
_DOCS = "https://docs.github.com/rest"


class SpecMissing(RuntimeError):
    pass


@dataclass
class GitHubOpenAPI:
    """The parsed description, loaded once per test session."""

    raw: dict[str, Any]
    api: OpenAPI
    finder: APICallPathFinder
    path: Path
    package_version: str
    load_seconds: float

    def resolve(self, node: Any) -> Any:
        """Follow a local `$ref` (`#/components/...`) until a plain node."""
        seen = 0
        while isinstance(node, dict) and "$ref" in node:
            ref = node["$ref"]
            if not ref.startswith("#/") or seen > 20:
                raise ValueError(f"unsupported $ref {ref!r}")
            node = self.raw
            for part in ref[2:].split("/"):
                node = node[part.replace("~1", "/").replace("~0", "~")]
            seen += 1
        return node


@functools.cache
def load_github_openapi() -> GitHubOpenAPI:
    path = Path(os.environ.get("DELIVERY_GITHUB_OPENAPI_SPEC", PACKAGE_DIR / SPEC_FILE))
    if not path.exists():
        raise SpecMissing(f"{path} is missing: run scripts/setup.sh (it installs @octokit/openapi under .tools/npm)")
    started = time.monotonic()
    raw = json.loads(path.read_bytes())
    # The description is GitHub's own and large: validating it would cost seconds and prove nothing here.
    api = OpenAPI.from_dict(raw, config=Config(spec_validator_cls=None))
    finder = APICallPathFinder(api.spec)
    # Warm the lazy parts (path templates, $ref resolution) once, inside the measured time.
    api.unmarshal_request(MockRequest(SERVER, "get", "/repos/o/r/deployments"))
    seconds = time.monotonic() - started
    pkg = path.parent.parent / "package.json"
    version = json.loads(pkg.read_text()).get("version", "?") if pkg.exists() else raw["info"].get("version", "?")
    return GitHubOpenAPI(raw=raw, api=api, finder=finder, path=path, package_version=version, load_seconds=seconds)


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    authorization: str  # "expected" | "missing" | "other"
    body: Any
    raw_without_authorization: str
    operation: str | None = None
    status: int | None = None


@dataclass
class Fault:
    kind: str  # "status" | "hang" | "drop"
    times: int | None  # None: every matching request
    operation: str | None = None  # operationId, None: any
    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None


def unused_url(prefix: str = "") -> str:
    """An http URL on 127.0.0.1 where nothing listens: connecting is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{prefix}"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _error_details(errors: list[Exception]) -> list[str]:
    out = []
    for e in errors:
        parts = [f"{type(e).__name__}: {e}"]
        cause = e.__cause__
        while cause is not None:
            parts.append(f"{type(cause).__name__}: {cause}")
            for se in getattr(cause, "schema_errors", ()) or ():
                parts.append(f"schema: {getattr(se, 'message', se)}")
            cause = cause.__cause__
        for se in getattr(e, "schema_errors", ()) or ():
            parts.append(f"schema: {getattr(se, 'message', se)}")
        out.append(" <- ".join(parts))
    return out


# "The maximum description length is 140 characters." GitHub states some limits only in a property's
# prose; they are read from the description rather than written here.
_PROSE_LIMIT = re.compile(r"maximum [\w ]*?length is (\d+) characters", re.IGNORECASE)


class FakeGitHub:
    """See the module docstring. Use as a context manager, or `start()` / `stop()`."""

    def __init__(self, openapi: GitHubOpenAPI, *, token: str, prefix: str = "", hang_seconds: float = 30.0) -> None:
        self.openapi = openapi
        self.token = token
        self.prefix = prefix.rstrip("/")
        self.hang_seconds = hang_seconds
        self.requests: list[Recorded] = []
        self.violations: list[str] = []
        self.faults: list[Fault] = []
        # Commits the repository does not have: a Deployment for one is refused like GitHub does.
        self.unknown_shas: set[str] = set()
        self.commit_statuses: dict[str, list[dict[str, Any]]] = {}
        self.deployments: dict[int, dict[str, Any]] = {}
        self.deployment_statuses: dict[int, list[dict[str, Any]]] = {}
        self._ids = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> FakeGitHub:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                pass

            def _any(self) -> None:
                fake._handle(self)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _any  # noqa: N815

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-github", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeGitHub:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}{self.prefix}"

    # -- what tests arrange and read ----------------------------------------------------------------

    def outage(self, *, status: int = 503, times: int | None = 1, operation: str | None = None,
               retry_after: float | None = None, headers: dict[str, str] | None = None) -> None:
        """The next `times` matching requests (None: all) get `status` instead of an answer."""
        hdrs = dict(headers or {})
        if retry_after is not None:
            hdrs["Retry-After"] = f"{retry_after:g}"
        self.faults.append(Fault("status", times, operation, status, hdrs))

    def hang(self, *, times: int | None = 1, operation: str | None = None) -> None:
        """Accept matching requests and never answer (until `hang_seconds` or the server stops)."""
        self.faults.append(Fault("hang", times, operation))

    def drop(self, *, times: int | None = 1, operation: str | None = None) -> None:
        """Close matching requests' connections without an answer."""
        self.faults.append(Fault("drop", times, operation))

    def take_violations(self) -> list[str]:
        with self._lock:
            out, self.violations = self.violations, []
        return out

    def calls(self, operation: str) -> list[Recorded]:
        return [r for r in self.requests if r.operation == operation]

    def statuses(self, sha: str) -> list[dict[str, Any]]:
        return list(self.commit_statuses.get(sha, []))

    def latest_statuses(self, sha: str) -> dict[str, str]:
        """context -> the latest state, as GitHub's combined status shows it."""
        out: dict[str, str] = {}
        for s in self.statuses(sha):
            out[s["context"]] = s["state"]
        return out

    def deployment_states(self, deployment_id: int) -> list[str]:
        return [s["state"] for s in self.deployment_statuses.get(deployment_id, [])]

    # -- request handling -----------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw_body = h.rfile.read(length) if length else b""
        split = urlsplit(h.path)
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        auth = h.headers.get("Authorization")
        headers = {k.lower(): v for k, v in h.headers.items() if k.lower() != "authorization"}
        head = "\n".join(f"{k}: {v}" for k, v in h.headers.items() if k.lower() != "authorization")
        try:
            body: Any = json.loads(raw_body) if raw_body else None
        except ValueError:
            body = raw_body.decode("utf-8", "replace")
        rec = Recorded(
            method=h.command, path=split.path, query=query, headers=headers,
            authorization=("missing" if auth is None else "expected" if auth == f"Bearer {self.token}" else "other"),
            body=body,
            raw_without_authorization=f"{h.command} {h.path}\n{head}\n\n{raw_body.decode('utf-8', 'replace')}",
        )
        with self._lock:
            self.requests.append(rec)

        # Always checked, outage or not: a malformed request must not hide behind a simulated 503.
        checked = self._check(h.command, split.path, query, dict(h.headers.items()), raw_body, rec)
        fault = self._take_fault(rec.operation)
        if fault is not None:
            self._apply_fault(h, fault, rec)
            return
        if auth is None or rec.authorization != "expected":
            self._send(h, rec, 401, {"message": "Bad credentials", "documentation_url": _DOCS})
            return
        if isinstance(checked, tuple):  # a violation: (status, body)
            self._send(h, rec, *checked)
            return
        status, payload, extra = self._dispatch(rec, checked)
        self._validate_answer(checked, status, payload, extra)
        self._send(h, rec, status, payload, extra)

    def _violation(self, text: str) -> None:
        with self._lock:
            self.violations.append(text)

    def _check(self, method: str, path: str, query: dict[str, str], headers: dict[str, str], raw_body: bytes,
               rec: Recorded) -> Any:
        """Validate against the description. Returns the request's context (a dict), or a 422 answer."""
        where = f"{method} {path}"
        if self.prefix and not (path == self.prefix or path.startswith(self.prefix + "/")):
            self._violation(f"{where}: not under the API base path {self.prefix!r}")
            return (404, {"message": "Not Found", "documentation_url": _DOCS})
        api_path = path[len(self.prefix):] or "/"
        content_type = headers.get("Content-Type") or headers.get("content-type") or ""
        req = MockRequest(SERVER, method.lower(), api_path, args=query, headers=headers,
                          data=raw_body or None, content_type=content_type.split(";")[0].strip().lower())
        try:
            found = self.openapi.finder.find(method.lower(), SERVER + api_path)
            rec.operation = (found.operation / "operationId").read_value()
            pattern = found.path_result.pattern
        except Exception as e:  # PathNotFound, OperationNotFound
            self._violation(f"{where}: not in GitHub's REST description ({type(e).__name__})")
            return (404, {"message": "Not Found", "documentation_url": _DOCS})
        result = self.openapi.api.unmarshal_request(req)
        problems = _error_details(list(result.errors))
        op = self.openapi.raw["paths"][pattern][method.lower()]
        problems += self._prose_limits(op, raw_body)
        if problems:
            self._violation(f"{where} ({rec.operation}): " + " | ".join(problems))
            return (422, {"message": "Validation Failed",
                          "errors": [{"resource": "Request", "code": "invalid", "message": p[:300]} for p in problems],
                          "documentation_url": _DOCS})
        return {"req": req, "op": op, "operation": rec.operation, "path": dict(result.parameters.path),
                "query": query, "body": json.loads(raw_body) if raw_body else None, "pattern": pattern}

    def _prose_limits(self, op: dict[str, Any], raw_body: bytes) -> list[str]:
        try:
            schema = self.openapi.resolve(op["requestBody"]["content"]["application/json"]["schema"])
            body = json.loads(raw_body) if raw_body else None
        except (KeyError, ValueError):
            return []
        out = []
        for name, prop in (schema.get("properties") or {}).items() if isinstance(body, dict) else ():
            m = _PROSE_LIMIT.search(str(self.openapi.resolve(prop).get("description", "")))
            value = body.get(name)
            if m and isinstance(value, str) and len(value) > int(m.group(1)):
                out.append(f"{name}: {len(value)} characters, over the documented maximum of {m.group(1)}")
        return out

    def _take_fault(self, operation: str | None) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.operation is not None and f.operation != operation:
                    continue
                if f.times is not None:
                    if f.times <= 0:
                        continue
                    f.times -= 1
                return f
        return None

    def _apply_fault(self, h: BaseHTTPRequestHandler, fault: Fault, rec: Recorded) -> None:
        if fault.kind == "hang":
            self._stopping.wait(self.hang_seconds)
            h.close_connection = True
            return
        if fault.kind == "drop":
            h.close_connection = True
            return
        body = fault.body or {"message": "Service Unavailable" if fault.status >= 500 else "API rate limit exceeded",
                              "documentation_url": _DOCS}
        self._send(h, rec, fault.status, body, fault.headers)

    def _send(self, h: BaseHTTPRequestHandler, rec: Recorded, status: int, payload: Any,
              headers: dict[str, str] | None = None) -> None:
        rec.status = status
        data = b"" if payload is None else json.dumps(payload).encode()
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json; charset=utf-8")
            h.send_header("Content-Length", str(len(data)))
            h.send_header("X-GitHub-Api-Version-Selected", "2022-11-28")
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
        except OSError:
            h.close_connection = True

    # -- answers built from the description -----------------------------------------------------

    def _example(self, op: dict[str, Any], status: str) -> Any:
        """The first example of the operation's `status` answer (a deep copy)."""
        content = self.openapi.resolve(op["responses"][status]).get("content", {}).get("application/json", {})
        for ex in (content.get("examples") or {}).values():
            return copy.deepcopy(self.openapi.resolve(ex)["value"])
        if "example" in content:
            return copy.deepcopy(content["example"])
        raise KeyError(f"no example for {op.get('operationId')} {status}")

    def _next_id(self) -> int:
        with self._lock:
            self._ids += 1
            return self._ids

    def _repo_api(self, ctx: dict[str, Any]) -> str:
        return f"{SERVER}/repos/{ctx['path']['owner']}/{ctx['path']['repo']}"

    def _dispatch(self, rec: Recorded, ctx: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        handler: Callable[[dict[str, Any]], tuple[int, Any, dict[str, str]]] | None = {
            "repos/create-commit-status": self._create_commit_status,
            "repos/create-deployment": self._create_deployment,
            "repos/create-deployment-status": self._create_deployment_status,
            "repos/list-deployments": self._list_deployments,
        }.get(ctx["operation"])
        if handler is not None:
            return handler(ctx)
        # Any other operation GitHub has: its documented success answer, unchanged.
        for code in sorted(ctx["op"]["responses"]):
            if code.startswith("2"):
                try:
                    return int(code), self._example(ctx["op"], code), {}
                except KeyError:
                    return int(code), None, {}
        return 204, None, {}

    def _create_commit_status(self, ctx: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        body, sha = ctx["body"], ctx["path"]["sha"]
        if sha in self.unknown_shas:
            return 422, {"message": f"No commit found for SHA: {sha}", "documentation_url": _DOCS}, {}
        out = self._example(ctx["op"], "201")
        now = _now()
        out.update(id=self._next_id(), state=body["state"], description=body.get("description"),
                   target_url=body.get("target_url"), context=body.get("context", "default"),
                   url=f"{self._repo_api(ctx)}/statuses/{sha}", created_at=now, updated_at=now)
        with self._lock:
            self.commit_statuses.setdefault(sha, []).append(out)
        return 201, out, {"Location": out["url"]}

    def _create_deployment(self, ctx: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        body = ctx["body"]
        ref = body["ref"]
        if ref in self.unknown_shas:
            return 422, {"message": f"No ref found for: {ref}", "documentation_url": _DOCS}, {}
        out = self._example(ctx["op"], "201")
        dep_id, now, env = self._next_id(), _now(), body.get("environment", "production")
        payload = body.get("payload", "")
        if isinstance(payload, str):
            payload = json.loads(payload) if payload.strip() else {}
        out.update(id=dep_id, sha=ref, ref=ref, task=body.get("task", "deploy"), payload=payload,
                   environment=env, original_environment=env, description=body.get("description", ""),
                   transient_environment=body.get("transient_environment", False),
                   production_environment=body.get("production_environment", env == "production"),
                   url=f"{self._repo_api(ctx)}/deployments/{dep_id}",
                   statuses_url=f"{self._repo_api(ctx)}/deployments/{dep_id}/statuses",
                   repository_url=self._repo_api(ctx), created_at=now, updated_at=now)
        with self._lock:
            self.deployments[dep_id] = out
            self.deployment_statuses[dep_id] = []
        return 201, out, {}

    def _create_deployment_status(self, ctx: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        body, dep_id = ctx["body"], int(ctx["path"]["deployment_id"])
        dep = self.deployments.get(dep_id)
        if dep is None:
            return 404, {"message": "Not Found", "documentation_url": _DOCS}, {}
        out = self._example(ctx["op"], "201")
        now = _now()
        log_url = body.get("log_url") or body.get("target_url") or ""
        out.update(id=self._next_id(), state=body["state"], description=body.get("description", ""),
                   environment=body.get("environment") or dep["environment"], target_url=log_url, log_url=log_url,
                   environment_url=body.get("environment_url", ""), deployment_url=dep["url"],
                   repository_url=dep["repository_url"], url=f"{dep['url']}/statuses/{dep_id}",
                   created_at=now, updated_at=now)
        with self._lock:
            self.deployment_statuses[dep_id].append(out)
        return 201, out, {"Location": out["url"]}

    def _list_deployments(self, ctx: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        q = ctx["query"]
        deps = sorted(self.deployments.values(), key=lambda d: d["id"], reverse=True)
        for key in ("sha", "ref", "task", "environment"):
            if key in q:
                deps = [d for d in deps if d.get(key) == q[key]]
        per_page = int(q.get("per_page", 30))
        return 200, deps[:per_page], {}

    def _validate_answer(self, ctx: dict[str, Any], status: int, payload: Any, headers: dict[str, str]) -> None:
        """The fake's own answer must match the description too (only documented statuses are checked)."""
        if str(status) not in ctx["op"]["responses"]:
            return
        resp = MockResponse(b"" if payload is None else json.dumps(payload).encode(), status_code=status,
                            headers=headers, content_type="application/json")
        result = self.openapi.api.unmarshal_response(ctx["req"], resp)
        if result.errors:
            self._violation(f"fake answer to {ctx['operation']} ({status}) does not match the description: "
                            + " | ".join(_error_details(list(result.errors))))
