"""The Prefect server stopped for 60 s in the middle of a deploy, then started again on the same port
and database: first on SQLite, then on PostgreSQL (the scale-out setup). The deploys are served by
deployments/serve.py with its production settings (the lock's default lease among them), as
`delivery up` runs it.

The deploy waits for Argo CD (paused) when the server stops, and a deploy of a newer commit waits
for the environment's lock behind it. While the server is away the first run keeps waiting, its
heartbeats, task-run events and lease renewals go unanswered, and the waiting run cannot ask for the
lock. Once it is back, Argo CD goes on: the first deploy completes having held its lock throughout
(read from the server's lease files, which live outside the database and can be read while it is
down: the lease never ran out and was renewed as soon as the server answered), only then does the
newer deploy get the lock, and it completes too. For both: one values commit for the tag, verified,
Git's last pipeline commit naming what serves, the lock free afterwards; serve itself outlives the
outage. Should the heartbeat automation mark a live run Crashed for the heartbeats the outage
swallowed, the run still completes (its process and its lock are intact) and any recovery of it
must end Completed having found nothing to do."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from delivery.runs import OUTAGE_RETRY_SECONDS
from delivery.settings import PROJECT_ROOT
from tests.faults.conftest import FaultEnv, SourceClone, app_version, wait_for
from tests.faults.prefect_runs import (
    BRANCH,
    ENV,
    ArgoPaused,
    commits_for,
    deployment_exists,
    git_names,
    lock_slots,
    recoveries,
    run_env,
    start_run,
    state,
    stop,
    verified_in_git,
)
from tests.postgres import private_postgres
from tests.prefect_server import PrefectServer

pytestmark = [pytest.mark.faults, pytest.mark.docker, pytest.mark.sandbox]

DOWN_SECONDS = 60
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")
# While the server is away a lease renewal is tried again every OUTAGE_RETRY_SECONDS (2 s).
RENEW_GRACE = OUTAGE_RETRY_SECONDS + 3


def start_serve(fe: FaultEnv, server: PrefectServer, log: Path) -> subprocess.Popen[bytes]:
    """`python -m deployments.serve` as `delivery up` starts it: no lease or retry setting of the
    tests' own, so the product's defaults are what is tested."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "deployments.serve"], cwd=PROJECT_ROOT,
                                env=run_env(fe, server), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


class Watch:
    """Every quarter second, who holds the environment's lock (the server's lease files, readable
    while it is down) and, while the server answers, the state of the runs we follow and of their
    recoveries: each change, with the seconds since the watch began."""

    def __init__(self, server: PrefectServer, runs: dict[str, str]) -> None:
        self.server, self.runs = server, runs  # label -> flow run id
        # The lock's limit: other leases (the deploy deployment's own concurrency limit) are not ours.
        self.limit = str(self._api(f"/v2/concurrency_limits/deploy:workout-api:{ENV}")["id"])
        self.zero = time.monotonic()
        self.events: list[tuple[float, str]] = []
        self.holders: list[tuple[float, tuple[str, ...]]] = []  # (t, labels of the lease holders)
        self.renewals: dict[str, list[float]] = {}  # label -> when its lease's expiration moved
        self.least_left: dict[str, float] = {}  # label -> the fewest seconds its lease had left
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="watch")

    def now(self) -> float:
        return time.monotonic() - self.zero

    def note(self, what: str) -> None:
        self.events.append((self.now(), what))

    def _api(self, path: str, body: dict[str, Any] | None = None) -> Any:
        req = urllib.request.Request(f"{self.server.api_url}{path}", method="GET" if body is None else "POST",
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=2) as r:
            return json.loads(r.read())

    def _leases(self) -> dict[str, datetime]:
        """Holder (label) -> expiration of each lease of the lock, from the server's lease files."""
        label = {run_id: name for name, run_id in self.runs.items()}
        out = {}
        for f in sorted((self.server.home / "concurrency_leases").glob("*-*.json")):
            try:
                lease = json.loads(f.read_text())
            except (OSError, ValueError):
                continue  # replaced while we read it
            if self.limit not in lease.get("resource_ids", []):
                continue
            holder = ((lease.get("metadata") or {}).get("holder") or {}).get("id", "")
            out[label.get(holder, holder[:8] or "?")] = datetime.fromisoformat(lease["expiration"])
        return out

    def _seen(self) -> dict[str, str]:
        seen: dict[str, str] = {}
        try:
            self._api("/health")
        except (urllib.error.URLError, OSError, ValueError) as e:
            return {"server": f"down ({type(e).__name__})"}
        seen["server"] = "up"
        try:
            for name, run_id in self.runs.items():
                st = self._api(f"/flow_runs/{run_id}")["state"]
                seen[name] = st["name"] + (f" ({st['message'][:100]})" if st.get("message") else "")
            rec = self._api("/flow_runs/filter", {"flows": {"name": {"any_": ["recover"]}}})
            for r in rec:
                for name, run_id in self.runs.items():
                    if r["parameters"].get("crashed_run_id") == run_id:
                        seen[f"recovery of {name}"] = r["state"]["name"]
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            pass
        return seen

    def _run(self) -> None:
        last: dict[str, str] = {}
        last_holders: tuple[str, ...] | None = None
        expirations: dict[str, datetime] = {}
        tick = 0
        while not self._stop.wait(0.25):
            leases = self._leases()
            holders = tuple(sorted(leases))
            if holders != last_holders:
                self.holders.append((self.now(), holders))
                self.note(f"lock held by: {', '.join(holders) or 'nobody'}")
                last_holders = holders
            now = datetime.now(UTC)
            for who, expires in leases.items():
                left = (expires - now).total_seconds()
                self.least_left[who] = min(self.least_left.get(who, left), left)
                if who in expirations and expires != expirations[who]:
                    self.renewals.setdefault(who, []).append(self.now())
                expirations[who] = expires
            tick += 1
            if tick % 4:
                continue
            for k, v in self._seen().items():
                if last.get(k) != v:
                    self.note(f"{k}: {v}")
                    last[k] = v

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def held_by_anyone_now(self) -> tuple[str, ...]:
        return tuple(self._leases())

    def held_by(self, label: str) -> list[tuple[float, float]]:
        """The intervals (start, end) during which `label` held the lock."""
        out, since = [], None
        for t, holders in [*self.holders, (self.now(), ())]:
            if label in holders and since is None:
                since = t
            elif label not in holders and since is not None:
                out.append((since, t))
                since = None
        return out

    def text(self) -> str:
        return "\n".join(f"  {t:6.1f} s  {what}" for t, what in self.events)


def state_history(server: PrefectServer, run_id: Any) -> list[str]:
    from prefect.client.orchestration import PrefectClient
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def go() -> list[str]:
        async with PrefectClient(server.api_url) as c:
            return [s.type.value for s in sorted(await c.read_flow_run_states(run_id), key=lambda s: s.timestamp)]

    return run_coro_as_sync(go())


def settled(server: PrefectServer, run_id: str, timeout: float) -> str:
    """The run's final state type. Crashed counts only once it stays so until `timeout`: the heartbeat
    automation may mark a live run Crashed after an outage, and the run then ends by itself."""
    deadline = time.monotonic() + timeout
    while (st := state(server, run_id)[0]) not in ("COMPLETED", "FAILED", "CANCELLED") and time.monotonic() < deadline:
        time.sleep(1)
    return st


def outage_mid_deploy(fe: FaultEnv, server: PrefectServer, source: SourceClone, tmp_path: Path) -> None:
    """Stop the server 60 s while one deploy waits for Argo CD and a newer one waits for the lock."""
    log = tmp_path / "serve.log"
    first_sha = source.commit(BRANCH, "waits for Argo CD through the outage")
    first_tag = f"main-{first_sha[:7]}"
    serve = start_serve(fe, server, log)
    watch: Watch | None = None
    try:
        wait_for(lambda: deployment_exists(server), 120, "the deploy deployment served", interval=0.5)
        with ArgoPaused(fe):
            first = str(start_run(server, first_sha))
            wait_for(lambda: commits_for(fe, first_tag) == 1, 180, "the first run's values commit", 0.5)
            newer_sha = source.commit(BRANCH, "queued behind it on the lock")
            newer_tag = f"main-{newer_sha[:7]}"
            newer = str(start_run(server, newer_sha))
            watch = Watch(server, {"first": first, "newer": newer}).__enter__()
            wait_for(lambda: state(server, newer)[0] == "RUNNING", 60, "the newer run to start", 0.5)
            # Its clone and its newest-wins check take a moment; then it waits for the lock.
            time.sleep(5)
            assert watch.held_by("first") and not watch.held_by("newer"), watch.text()
            watch.note("stopping the server")
            stopped = watch.now()
            outage = server.down_for(DOWN_SECONDS)
            watch.note(f"the server answers again, {outage.seconds:.0f} s after it stopped; Argo CD goes on")
            back = watch.now()
        assert serve.poll() is None, f"serve died in the outage:\n{log.read_text()[-4000:]}"
        finals = {label: settled(server, run_id, 300) for label, run_id in (("first", first), ("newer", newer))}
        # A run marked Crashed for its lost heartbeats is taken over by a recovery: wait for it too.
        for label, run_id in (("first", first), ("newer", newer)):
            for r in recoveries(server, run_id):
                wait_for(lambda r=r: state(server, r.id)[0] in FINAL, 300, f"the recovery of the {label} run", 1)
        wait_for(lambda: lock_slots(server) == 0, 30, "the lock free", 0.5)
        watch.__exit__()
        print(f"\n{watch.text()}")
        history = {label: state_history(server, run_id) for label, run_id in (("first", first), ("newer", newer))}
        print(f"state histories: {history}")

        assert finals == {"first": "COMPLETED", "newer": "COMPLETED"}, (finals, watch.text())
        # The first deploy held its lock from before the outage until it ended, without a gap: the
        # server did not give it to the waiting run at its restart.
        held = watch.held_by("first")
        assert len(held) == 1 and held[0][0] < stopped and held[0][1] > back, (held, watch.text())
        # Its lease never ran out (Prefect's repossessor would have freed the slot at the restart),
        # and, if the run still held it a few seconds after the server answered again, it had been
        # renewed by then (a run that finishes at once releases it before its next attempt).
        assert watch.least_left["first"] > 0, watch.least_left
        renewed = [t - back for t in watch.renewals.get("first", []) if t > stopped]
        if held[0][1] > back + RENEW_GRACE:
            assert renewed and renewed[0] <= RENEW_GRACE, (watch.renewals, stopped, back)
        print(f"the first run's lease: at least {watch.least_left['first']:.0f} s left at any time; held "
              f"{held[0][1] - back:.1f} s after the server answered again; renewed then: "
              f"{', '.join(f'{t:+.1f} s' for t in renewed) or 'no need'}")
        newer_held = watch.held_by("newer")
        assert newer_held and newer_held[0][0] >= held[0][1], (held, newer_held, watch.text())
        for label, run_id in (("first", first), ("newer", newer)):
            for r in recoveries(server, run_id):
                # Marked Crashed while alive (its heartbeats were lost with the server): the recovery
                # waited for the lock, found the run finished by itself and did nothing.
                assert "CRASHED" in history[label], history
                assert state(server, r.id)[0] == "COMPLETED", state(server, r.id)
        for tag in (first_tag, newer_tag):
            assert commits_for(fe, tag) == 1, tag
            assert verified_in_git(fe, tag), tag
        assert app_version(fe.health_url(ENV)) == newer_tag
        assert git_names(fe) == newer_tag, "Git's last pipeline commit names what serves"
        assert not watch.held_by_anyone_now(), "no lease of the lock left behind"
        assert serve.poll() is None, "serve outlives the outage"
    except BaseException:
        if watch is not None:
            watch.__exit__()
            print(f"\n{watch.text()}")
        print(log.read_text(errors="replace")[-6000:])
        raise
    finally:
        stop(serve)


def test_prefect_server_down_60s_mid_deploy_sqlite(settings_of: FaultEnv, server: PrefectServer,
                                                    source: SourceClone, tmp_path: Path) -> None:
    """SQLite server stopped 60 s mid-deploy: the deploy completes holding its lock; the queued one follows."""
    outage_mid_deploy(settings_of, server, source, tmp_path)


# ---------------------------------------------------------------- PostgreSQL


def _processes_showing(secret: str) -> list[str]:
    """The command lines (of any process on the machine) that contain `secret`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes()
        except OSError:
            continue
        if secret.encode() in args:
            found.append(args.replace(b"\0", b" ").decode(errors="replace")[:200])
    return found


@pytest.fixture(scope="module")
def postgres() -> Iterator[tuple[str, str]]:
    """A private PostgreSQL cluster: (connection URL, its password)."""
    with private_postgres() as pg:
        yield pg


@pytest.fixture(scope="module")
def pg_server(postgres: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A `prefect server start` of the module's own on that PostgreSQL database."""
    url, password = postgres
    s = PrefectServer(tmp_path_factory.mktemp("prefect-home-pg"), database_url=url)
    s.start()
    try:
        assert not _processes_showing(password), "the database password is in a process's arguments"
        yield s
    finally:
        s.stop()


def test_prefect_server_down_60s_mid_deploy_postgres(settings_of: FaultEnv, pg_server: PrefectServer,
                                                      postgres: tuple[str, str], source: SourceClone,
                                                      tmp_path: Path) -> None:
    """PostgreSQL server stopped 60 s mid-deploy: the same, and the password never in a process's arguments."""
    assert not (pg_server.home / "prefect.db").exists(), "the server uses PostgreSQL, not SQLite"
    outage_mid_deploy(settings_of, pg_server, source, tmp_path)
    assert not _processes_showing(postgres[1]), "the database password is in a process's arguments"
