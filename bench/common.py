"""Shared plumbing of the benchmarks that run against the local stack (`delivery up`).

Figures, not tests: every helper here measures or sets up; nothing asserts a duration. Each benchmark
prints medians and p95 over repeated runs and writes JSON under bench/results/ (git-ignored).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
EXAMPLE = ROOT / "examples" / "workout-api"
SETTINGS_REL = "app/settings.env"

# The stack's Prefect server always listens here (sandbox.manager.PREFECT_PORT); Prefect reads its
# settings when first imported, so this must be in the environment before any `import prefect`.
os.environ.setdefault("PREFECT_API_URL", "http://127.0.0.1:4200/api")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def quiet() -> None:
    """Product code logs every step; a benchmark prints only its figures."""
    for name in ("delivery", "prefect", "httpx", "kubernetes", "urllib3", "docker"):
        logging.getLogger(name).setLevel(logging.WARNING)


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------ statistics


def p95(values: list[float]) -> float:
    """Nearest-rank 95th percentile (with a handful of samples it is the largest but one, or the max)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, -(-95 * len(ordered) // 100) - 1))]


def summarize(values: Iterable[float | None], digits: int = 3) -> dict[str, Any]:
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "median": round(statistics.median(xs), digits), "p95": round(p95(xs), digits),
            "min": round(min(xs), digits), "max": round(max(xs), digits)}


def fmt(s: dict[str, Any], unit: str = "s", scale: float = 1.0) -> str:
    if not s or not s.get("n"):
        return "n/a"
    prec = 3 if unit in ("ms", "µs") else 2
    return (f"median {s['median'] * scale:.{prec}f} {unit}  p95 {s['p95'] * scale:.{prec}f} {unit}  "
            f"min {s['min'] * scale:.{prec}f}  max {s['max'] * scale:.{prec}f}  (n={s['n']})")


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 1) if a and b else None


# ------------------------------------------------------------------------------------ machine, results


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    try:
        import prefect

        prefect_version = prefect.__version__
    except ImportError:
        prefect_version = ""
    return {"nproc": os.cpu_count(), "mem_total_gib": round(mem_kb / 1024 / 1024, 1), "cpu": cpu,
            "date": datetime.now(UTC).isoformat(timespec="seconds"), "python": platform.python_version(),
            "prefect": prefect_version, "kernel": platform.release(),
            "loadavg": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []}


def save(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


# ------------------------------------------------------------------------------------ the stack


@dataclass
class Ctx:
    """What every stack benchmark needs: the running stack, the sandbox config and the sample app."""

    stack: Any
    state: dict[str, Any]
    config: Any
    app: Any
    secret: str
    quick: bool = False
    real: bool = False
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    clone_dir: Path = field(default_factory=lambda: ROOT / ".sandbox" / "bench" / "workout-api")

    @property
    def webhook(self) -> str:
        return f"{self.stack.webhook_url}/webhooks/github"

    def env(self, name: str) -> Any:
        return self.app.environment(name)


def ensure_stack(*, quick: bool = False, real: bool = False) -> Ctx:
    """`sandbox.stack.up()`: starts whatever part of the stack is not running, reuses the rest; with
    `real`, on the real tier (a one-node Kubernetes and Argo CD built from Go modules)."""
    quiet()
    from delivery.config import load_config
    from delivery.settings import get_settings
    from sandbox import stack

    t0 = time.monotonic()
    st = stack.up(real=real)
    say(f"stack up{' on the real tier' if real else ''} in {time.monotonic() - t0:.1f} s "
        f"(Prefect {st.prefect_api_url}, webhook {st.webhook_url})")
    s = get_settings()
    raw = json.loads((s.sandbox_dir / "state.json").read_text())
    os.environ.setdefault("DELIVERY_CONFIG_FILE", str(s.sandbox_config_file))
    os.environ.setdefault("DELIVERY_KUBECONFIG", str(s.sandbox_kubeconfig))
    cfg = load_config(s.sandbox_config_file)
    return Ctx(stack=st, state=raw, config=cfg, app=cfg.app("workout-api"), secret=stack.sandbox_webhook_secret(),
               quick=quick, clone_dir=s.sandbox_dir / "bench" / "workout-api", real=real)


def stack_pids(ctx: Ctx) -> dict[str, int]:
    parts = ctx.state.get("parts", {})
    pids = {"serve": ctx.stack.serve_pid, "webhook": ctx.stack.webhook_pid}
    for name in ("argocd", "kube", "prefect"):
        if parts.get(name, {}).get("pid"):
            pids[name] = int(parts[name]["pid"])
    return {k: v for k, v in pids.items() if v}


# ------------------------------------------------------------------------------------ source commits


def source_repo(ctx: Ctx) -> Any:
    from sandbox.demo import source_clone

    repo = source_clone(ctx.app.source_repo, ctx.clone_dir)
    repo.remotes.origin.fetch()
    return repo


def settings_text(*, healthy: bool = True, marker: str = "") -> str:
    """The sample app's settings.env, healthy or not, with a marker line so every commit differs."""
    text = (EXAMPLE / SETTINGS_REL).read_text()
    text = text.replace("HEALTHY=true", "HEALTHY=true" if healthy else "HEALTHY=false")
    text = text.replace("CRASH_ON_START=true", "CRASH_ON_START=false")
    return text.rstrip("\n") + (f"\n# {marker}\n" if marker else "\n")


def commit_local(repo: Any, branch: str, text: str, message: str, *, base: str | None = None) -> str:
    """Commit settings.env on top of `base` (default origin/<branch>) without pushing; returns the SHA."""
    import git

    repo.git.checkout("-B", branch, base or f"origin/{branch}")
    (Path(repo.working_tree_dir) / SETTINGS_REL).write_text(text)
    repo.index.add([SETTINGS_REL])
    actor = git.Actor("bench", "bench@example.com")
    repo.index.commit(message, author=actor, committer=actor)
    return repo.head.commit.hexsha


def push_sha(repo: Any, sha: str, branch: str) -> None:
    subprocess.run(["git", "push", "-q", "origin", f"{sha}:refs/heads/{branch}"], cwd=repo.working_tree_dir,
                   check=True, capture_output=True)


def deliver_push(ctx: Ctx, branch: str, before: str, after: str, message: str,
                 delivery_id: str | None = None) -> tuple[int, dict[str, Any], float]:
    """A signed GitHub push webhook to the stack's receiver; returns (status, answer, seconds to answer)."""
    from sandbox.demo import deliver, push_payload

    payload = push_payload(f"refs/heads/{branch}", before, after, ctx.app.source_repo,
                           [{"id": after, "message": message}])
    t0 = time.monotonic()
    status, answer = deliver(ctx.webhook, ctx.secret, payload, delivery_id=delivery_id)
    return status, answer, time.monotonic() - t0


def push_and_deliver(ctx: Ctx, repo: Any, branch: str, text: str, message: str) -> dict[str, Any]:
    """Commit, push and deliver the webhook: the user's `git push` as GitHub would report it."""
    repo.remotes.origin.fetch()
    before = repo.commit(f"origin/{branch}").hexsha
    after = commit_local(repo, branch, text, message)
    push_sha(repo, after, branch)
    from sandbox.demo import runs_of

    status, answer, ack = deliver_push(ctx, branch, before, after, message)
    accepted = time.time()
    runs = runs_of(answer) if status == 202 else []
    if not runs:
        raise RuntimeError(f"the webhook did not queue a deploy: {status} {answer}")
    return {"sha": after, "before": before, "accepted_at": accepted, "ack_s": ack,
            "run_id": runs[0]["flow_run_id"]}


def tag_for(ctx: Ctx, branch: str, sha: str) -> str:
    from tasks.images import image_tags

    return image_tags(f"refs/heads/{branch}", sha, ctx.app.default_branch)[0]


# ------------------------------------------------------------------------------------ HTTP health


def health(url: str, timeout: float = 1.0) -> tuple[int, str]:
    """(status, version) of the app's health endpoint; (0, error) when it does not answer."""
    from urllib.parse import urlsplit

    if url.startswith("kube-proxy://"):
        # The real tier: through the API server's service proxy, as the pipeline's probe goes.
        from tasks.probes import fetch_health

        code, body = fetch_health(url, timeout=max(timeout, 3.0))
        try:
            return code, str(json.loads(body).get("version", "")) if code else body
        except (ValueError, AttributeError):
            return code, ""

    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    try:
        conn.request("GET", u.path or "/")
        resp = conn.getresponse()
        body = resp.read()
        try:
            version = str(json.loads(body).get("version", ""))
        except (ValueError, AttributeError):
            version = ""
        return resp.status, version
    except OSError as e:
        return 0, type(e).__name__
    finally:
        conn.close()


def wait_for_version(url: str, version: str, timeout: float, interval: float = 0.05) -> float | None:
    """Seconds until `url` answers 200 with `version`, or None after `timeout`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        code, v = health(url)
        if code == 200 and v == version:
            return time.monotonic() - t0
        time.sleep(interval)
    return None


class HealthWatcher(threading.Thread):
    """Polls a health URL in the background: when each version first answered, and every moment the
    app did not answer 200 (what a user would have seen as downtime)."""

    def __init__(self, url: str, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.url, self.interval = url, interval
        self.first_seen: dict[str, float] = {}
        self.bad: list[tuple[float, int, str]] = []
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            code, v = health(self.url)
            now = time.time()
            self.samples += 1
            if code == 200:
                self.first_seen.setdefault(v, now)
            else:
                self.bad.append((now, code, v))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    def downtime_s(self) -> float:
        """Non-200 samples × the sampling interval: an upper bound on what a user could have missed."""
        return round(len(self.bad) * self.interval, 2)


# ------------------------------------------------------------------------------------ Prefect


def prefect_client() -> Any:
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def read_run(run_id: str) -> Any:
    with prefect_client() as c:
        return c.read_flow_run(uuid.UUID(str(run_id)))


def wait_final(run_id: str, timeout: float, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    with prefect_client() as c:
        while True:
            run = c.read_flow_run(uuid.UUID(str(run_id)))
            if run.state and run.state.is_final():
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"flow run {run.name} still {run.state_name} after {timeout:.0f} s")
            time.sleep(interval)


def report_of(run_id: str) -> dict[str, Any] | None:
    """The run's own report summary (delivery.report), parsed from its markdown artifact."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    from delivery.report import parse_summary

    with prefect_client() as c:
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[uuid.UUID(str(run_id))]),
            type=ArtifactFilterType(any_=["markdown"])))
    for a in arts:
        if isinstance(a.data, str):
            s = parse_summary(a.data)
            if s:
                return s
    return None


def ts(dt: Any) -> float | None:
    return dt.timestamp() if dt is not None else None


def stage_seconds(report: dict[str, Any] | None, name: str) -> float:
    return round(sum(s["seconds"] for s in (report or {}).get("stages", []) if s["name"] == name), 3)


# ------------------------------------------------------------------------------------ images


def build_sample_image(tag: str, *, healthy: bool = True) -> dict[str, float]:
    """Build the sample app with APP_VERSION=tag (as the pipeline would) and push it; returns seconds."""
    from sandbox.engine import BASE_IMAGE
    from sandbox.manager import IMAGE_REPOSITORY
    from tasks.images import build_image, image_exists, push_image

    if image_exists(IMAGE_REPOSITORY, tag):
        return {"build_s": 0.0, "push_s": 0.0}
    with tempfile.TemporaryDirectory(prefix="bench-img-") as tmp:
        ctx_dir = Path(tmp) / "ctx"
        shutil.copytree(EXAMPLE, ctx_dir)
        (ctx_dir / SETTINGS_REL).write_text(settings_text(healthy=healthy, marker=f"bench image {tag}"))
        t0 = time.monotonic()
        build_image(ctx_dir, IMAGE_REPOSITORY, [tag], build_args={"BASE_IMAGE": BASE_IMAGE, "APP_VERSION": tag})
        t1 = time.monotonic()
        push_image(IMAGE_REPOSITORY, [tag])
        t2 = time.monotonic()
    return {"build_s": round(t1 - t0, 3), "push_s": round(t2 - t1, 3)}


# ------------------------------------------------------------------------------------ memory


def _proc_table() -> dict[int, int]:
    """pid -> ppid for every process."""
    out: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            out[int(d)] = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return out


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree(pid: int, table: dict[int, int]) -> list[int]:
    kids: dict[int, list[int]] = {}
    for p, pp in table.items():
        kids.setdefault(pp, []).append(p)
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


class MemSampler(threading.Thread):
    """Samples the process trees of named pids: the root's VmHWM, each descendant's VmHWM, and the
    largest sum of VmRSS over the whole tree seen at one instant (peak resident memory incl. children)."""

    def __init__(self, roots: dict[str, int], interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.roots, self.interval = roots, interval
        self.stats: dict[str, dict[str, Any]] = {
            n: {"pid": p, "root_hwm_mib": 0.0, "max_child_hwm_mib": 0.0, "peak_tree_rss_mib": 0.0,
                "max_children": 0} for n, p in roots.items()}
        self._halt = threading.Event()

    def sample(self) -> None:
        table = _proc_table()
        for name, pid in self.roots.items():
            if pid not in table:
                continue
            pids = tree(pid, table)
            st = self.stats[name]
            st["root_hwm_mib"] = max(st["root_hwm_mib"], _status_kb(pid, "VmHWM") / 1024)
            children = [p for p in pids if p != pid]
            st["max_children"] = max(st["max_children"], len(children))
            for p in children:
                st["max_child_hwm_mib"] = max(st["max_child_hwm_mib"], _status_kb(p, "VmHWM") / 1024)
            rss = sum(_status_kb(p, "VmRSS") for p in pids) / 1024
            st["peak_tree_rss_mib"] = max(st["peak_tree_rss_mib"], rss)

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> dict[str, dict[str, Any]]:
        self._halt.set()
        self.join(5)
        self.sample()
        return {n: {k: (round(v, 1) if isinstance(v, float) else v) for k, v in s.items()}
                for n, s in self.stats.items()}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.monotonic()
    out = fn()
    return out, time.monotonic() - t0


# ------------------------------------------------------------------------------------ soak helpers


def bad_settings_text(marker: str = "", fault: str = "crash") -> str:
    """A bad release of the sample app: crashes at start (`crash`) or never passes readiness (`unhealthy`)."""
    text = settings_text(healthy=fault != "unhealthy", marker=marker)
    if fault == "crash":
        text = text.replace("CRASH_ON_START=false", "CRASH_ON_START=true")
    return text


def unfinished_runs(horizon: float = 5.0) -> list[Any]:
    """Flow runs that are pending, running or cancelling, or scheduled to start within `horizon` seconds
    (the drift check's cron runs further ahead do not count)."""
    from datetime import timedelta

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    active = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]
    due = datetime.now(UTC) + timedelta(seconds=horizon)
    with prefect_client() as c:
        runs = c.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=active))), limit=200)
    return [r for r in runs if not (r.state_type == StateType.SCHEDULED and r.expected_start_time
                                    and r.expected_start_time > due)]


def wait_idle(timeout: float, interval: float = 1.0) -> float:
    """Seconds until no flow run is unfinished (`unfinished_runs`); raises TimeoutError naming them."""
    t0 = time.monotonic()
    while True:
        left = unfinished_runs()
        if not left:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            names = ", ".join(f"{r.name} ({r.state_name})" for r in left[:5])
            raise TimeoutError(f"{len(left)} flow run(s) still unfinished after {timeout:.0f} s: {names}")
        time.sleep(interval)


def tree_files(root: Path) -> tuple[int, int]:
    """(files, bytes) under `root`, not following symlinks; (0, 0) when it does not exist."""
    files = size = 0
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except OSError:
                continue
            files += 1
            size += st.st_size
    return files, size


def pids_by_argv0(name: str) -> list[int]:
    """Pids whose program (argv[0]'s last part) is `name`: for reading shared processes, never stopping them."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            argv0 = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
        except OSError:
            continue
        if argv0 and Path(argv0).name == name:
            out.append(int(d))
    return out


def listener_pid(port: int) -> int | None:
    """The pid of the process listening on TCP `port` (IPv4 or IPv6), from /proc: for reading only."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(cols[9])
    if not inodes:
        return None
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{d}/fd"):
                link = os.readlink(f"/proc/{d}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(d)
        except OSError:
            continue
    return None
