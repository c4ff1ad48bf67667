"""Soak (issue 16): many deploys in a row on the running stack (`delivery up`), one in five a bad
release that rolls back, watching for leaks.

    .venv/bin/python bench/bench_soak.py [--count 200] [--every 50] [--bad-every 5] [--env dev]

Each deploy is a new commit on the environment's deploying branch of the sample app, pushed and
announced with a signed webhook, then waited for until its run is final (as a user's `git push`).
Every `--bad-every`-th commit is a bad release (`CRASH_ON_START=true`, as bench_restore.py): the
deploy must catch it from the new pod, roll back and end `Failed` with the report's result
"rolled-back"; every other one must end `Completed`. A verified dev deploy also starts its automatic
promotion to staging, so the stack runs about twice as many flow runs as there are deploys.

At 0 deploys and after every `--every` deploys (a checkpoint) it first waits until no flow run is
unfinished (the promotions included) and a few seconds more, then records:

- the resident memory (median of 5 readings 1 s apart) of every long-lived process of the stack,
  with its children: the Prefect server, serve (its fork server included), the webhook receiver,
  the Kubernetes API and Argo CD emulators; the shared Docker engine and registry as information;
- their open file descriptors and number of processes;
- the engine's containers (this stack's, by the sandbox's root label, and all), images (this stack's,
  by their OCI source label, and all) and networks; the cluster's pods and ReplicaSets;
- files under the flows' work directory and under TMPDIR (give the stack its own TMPDIR, see below),
  and the flows' scratch directories left in the work directory;
- the concurrency-limit slots held (every global limit's active slots) and the lease files on disk;
- the Prefect database: its file, its WAL, and the rows of its tables.

Targets (judged at the end, one line each): memory grows less than 10 % from the first checkpoint
after 0 to the last (50 → 200); containers, temp entries, scratch directories, slots and leases are
back at their baseline; processes back at theirs; descriptors within max(5, 10 %) of the first
checkpoint after 0; networks and pods at baseline; ReplicaSets within the Deployments' history limit;
images at most one per build; the database's growth per deploy not rising (the last interval's rate
under 1.5× that of the second, 50 → 100), with the rows per deploy printed to show it is run history.
Figures go to bench/results/soak.json; the process exits 1 when a target is missed.

Run it against a stack of its own, so that other stacks' runs, containers and temp files do not
count (TMPDIR must be set before `delivery up`, since the stack's processes inherit it):

    export DELIVERY_SANDBOX_DIR=/tmp/soak-stack/sandbox DELIVERY_PREFECT_PORT=4300 \\
        PREFECT_API_URL=http://127.0.0.1:4300/api DELIVERY_WEBHOOK_PORT=8180 \\
        DELIVERY_APP_PORT_BASE=28080 TMPDIR=/tmp/soak-stack/tmp
    mkdir -p $TMPDIR && .venv/bin/delivery up && .venv/bin/python bench/bench_soak.py
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import common
from common import Ctx, push_and_deliver, report_of, say, settings_text, source_repo, stack_pids, tree, wait_final

MEMORY_GROWTH_MAX = 0.10
# Prefixes of the flows' per-run scratch directories in the work directory (flows/*.py `mkdtemp`).
SCRATCH_PREFIXES = ("run-", "promote-", "read-back-", "recover-")
DB_TABLES = ("flow_run", "flow_run_state", "task_run", "task_run_state", "log", "artifact", "artifact_collection",
             "events", "event_resources", "flow_run_input", "automation_bucket", "automation_event_follower",
             "automation_held_event", "composite_trigger_child_firing", "concurrency_limit_v2", "csrf_token")


# ------------------------------------------------------------------------------------ readings


def _rss_mib(pid: int) -> float:
    return common._status_kb(pid, "VmRSS") / 1024


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def shared_pids() -> dict[str, int]:
    """The Docker engine (containerd is its child) and the registry: shared with other stacks, read only."""
    out: dict[str, int] = {}
    try:
        out["dockerd"] = int(Path("/var/run/docker.pid").read_text().strip())
    except (OSError, ValueError):
        found = common.pids_by_argv0("dockerd")
        if found:
            out["dockerd"] = min(found)
    from sandbox.engine import REGISTRY_ADDR

    registry = common.listener_pid(int(REGISTRY_ADDR.rsplit(":", 1)[1]))
    if registry:
        out["registry"] = registry
    return out


def processes(pids: dict[str, int], readings: int = 5, gap: float = 1.0) -> dict[str, dict[str, Any]]:
    """Per named process: median root and tree RSS over `readings` readings, tree fds and processes."""
    rss: dict[str, list[float]] = {n: [] for n in pids}
    tree_rss: dict[str, list[float]] = {n: [] for n in pids}
    fds: dict[str, list[int]] = {n: [] for n in pids}
    procs: dict[str, list[int]] = {n: [] for n in pids}
    table: dict[int, int] = {}
    for k in range(readings):
        if k:
            time.sleep(gap)
        table = common._proc_table()
        for name, pid in pids.items():
            if pid in table:
                members = tree(pid, table)
                rss[name].append(_rss_mib(pid))
                tree_rss[name].append(sum(_rss_mib(p) for p in members))
                fds[name].append(sum(_fds(p) for p in members))
                procs[name].append(len(members))
    out: dict[str, dict[str, Any]] = {}
    for name, pid in pids.items():
        if pid not in table or not rss[name]:
            out[name] = {"pid": pid, "alive": False}
            continue
        # Descriptors and processes: the fewest seen, since a leaked one stays through every reading
        # while a passing child (the emulator's `git fetch`) does not.
        out[name] = {"pid": pid, "alive": True, "rss_mib": round(statistics.median(rss[name]), 1),
                     "tree_rss_mib": round(statistics.median(tree_rss[name]), 1),
                     "tree_rss_readings": [round(x, 1) for x in tree_rss[name]],
                     "fds": min(fds[name]), "fds_readings": fds[name],
                     "procs": min(procs[name]), "procs_readings": procs[name]}
    return out


def engine(root: Path) -> dict[str, Any]:
    import docker

    from sandbox.manager import LABEL

    client = docker.from_env(timeout=60)
    try:
        mine = client.containers.list(all=True, filters={"label": [f"{LABEL}/root={root}"]})
        every = client.containers.list(all=True)
        images = client.images.list()
        ours = [i for i in images if str(root) in (i.labels or {}).get("org.opencontainers.image.source", "")]
        # What this stack's images cost on disk beyond the layers they share (the base image's).
        ids = {i.id for i in ours}
        unique = sum(max(0, d.get("Size", 0) - max(0, d.get("SharedSize", 0)))
                     for d in client.df().get("Images") or [] if d.get("Id") in ids)
        return {"containers": len(mine), "containers_running": sum(1 for c in mine if c.status == "running"),
                "engine_containers": len(every), "images": len(ours), "images_unique_mib": round(unique / 2**20, 2),
                "engine_images": len(images),
                "dangling_images": len(client.images.list(filters={"dangling": True})),
                "networks": len(client.networks.list())}
    finally:
        client.close()


def cluster_objects(kubeconfig: Path) -> dict[str, Any]:
    """ReplicaSets, pods and events in the cluster (the emulator keeps them in memory)."""
    from kubernetes import client, config

    try:
        api = config.new_client_from_config(config_file=str(kubeconfig))
    except Exception as e:  # noqa: BLE001 - a figure missing, not a failed soak
        return {"error": f"{type(e).__name__}: {e}"}
    try:
        apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
        return {"replicasets": len(apps.list_replica_set_for_all_namespaces(_request_timeout=30).items),
                "pods": len(core.list_pod_for_all_namespaces(_request_timeout=30).items),
                "events": len(core.list_event_for_all_namespaces(_request_timeout=30).items)}
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        api.close()


def files(work: Path, tmp: Path) -> dict[str, Any]:
    work_files, work_bytes = common.tree_files(work)
    tmp_files, tmp_bytes = common.tree_files(tmp)
    scratch = sorted(str(p.relative_to(work)) for p in work.glob("*/*")
                     if p.is_dir() and p.name.startswith(SCRATCH_PREFIXES))
    try:
        tmp_entries = sorted(os.listdir(tmp))
    except OSError:
        tmp_entries = []
    return {"work_files": work_files, "work_mib": round(work_bytes / 2**20, 2), "scratch_dirs": len(scratch),
            "scratch": scratch[:20], "tmp_entries": len(tmp_entries), "tmp_names": tmp_entries[:40],
            "tmp_files": tmp_files, "tmp_mib": round(tmp_bytes / 2**20, 2)}


def slots(prefect_home: Path) -> dict[str, Any]:
    with common.prefect_client() as c:
        limits = c.read_global_concurrency_limits(limit=200, offset=0)
    held = {gl.name: gl.active_slots for gl in limits if gl.active_slots}
    leases = [p for p in (prefect_home / "concurrency_leases").glob("*.json") if p.name != "expirations.json"]
    return {"slots_held": sum(held.values()), "held": held, "limits": len(limits), "lease_files": len(leases)}


def database(db: Path) -> dict[str, Any]:
    def mib(p: Path) -> float:
        try:
            return round(p.stat().st_size / 2**20, 2)
        except OSError:
            return 0.0

    rows: dict[str, int] = {}
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            present = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
            for t in DB_TABLES:
                if t in present:
                    rows[t] = con.execute(f'select count(*) from "{t}"').fetchone()[0]  # noqa: S608 - fixed names
            pages = con.execute("pragma page_count").fetchone()[0]
            free = con.execute("pragma freelist_count").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error as e:
        return {"db_mib": mib(db), "wal_mib": mib(db.with_name(db.name + "-wal")), "error": str(e), "rows": rows}
    return {"db_mib": mib(db), "wal_mib": mib(db.with_name(db.name + "-wal")),
            "total_mib": round(mib(db) + mib(db.with_name(db.name + "-wal")), 2),
            "pages": pages, "free_pages": free, "rows": rows}


class LoadWatcher(threading.Thread):
    """The 1-minute load average every `interval` seconds, for the record of how busy the machine was."""

    def __init__(self, interval: float = 15.0) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.readings: list[tuple[float, float]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.readings.append((time.time(), float(Path("/proc/loadavg").read_text().split()[0])))
            except (OSError, ValueError):
                pass
            self._halt.wait(self.interval)

    def stop(self) -> dict[str, Any]:
        self._halt.set()
        self.join(5)
        return common.summarize([x for _, x in self.readings], 2)


# ------------------------------------------------------------------------------------ checkpoint


class Stack:
    """Where this stack keeps what a checkpoint reads."""

    def __init__(self, ctx: Ctx) -> None:
        from delivery.settings import get_settings

        s = get_settings()
        self.root = s.sandbox_dir.resolve()
        self.work = s.work_dir.resolve()
        self.tmp = Path(tempfile.gettempdir()).resolve()
        self.prefect_home = self.root / "prefect"
        self.db = self.prefect_home / "prefect.db"
        self.pids = stack_pids(ctx)
        self.shared = shared_pids()


def checkpoint(st: Stack, deploys: int, idle_timeout: float, settle: float) -> dict[str, Any]:
    t0 = time.monotonic()
    idle_s = common.wait_idle(idle_timeout)
    # A finished run's process may still be exiting, and an old pod drains for a second before it goes.
    time.sleep(settle)
    out: dict[str, Any] = {"deploys": deploys, "t": round(time.time(), 1), "idle_wait_s": round(idle_s, 1),
                           "loadavg": Path("/proc/loadavg").read_text().split()[:3]}
    out["parts"] = processes(st.pids)
    out["shared"] = processes(st.shared, readings=1)
    out["engine"] = engine(st.root)
    out["cluster"] = cluster_objects(st.root / "kubeconfig")
    out["files"] = files(st.work, st.tmp)
    out["slots"] = slots(st.prefect_home)
    out["db"] = database(st.db)
    out["machine_procs"] = len(common._proc_table())
    out["sample_s"] = round(time.monotonic() - t0, 1)
    return out


def print_checkpoint(s: dict[str, Any]) -> None:
    parts = "  ".join(f"{n} {p['tree_rss_mib']:.0f} MiB/{p['fds']} fd/{p['procs']} proc" if p.get("alive")
                      else f"{n} GONE" for n, p in s["parts"].items())
    e, f, sl, db = s["engine"], s["files"], s["slots"], s["db"]
    say(f"after {s['deploys']:>4} deploys (idle after {s['idle_wait_s']} s, load {' '.join(s['loadavg'])}): {parts}")
    say(f"      containers {e['containers']} ({e['containers_running']} running), images {e['images']} "
        f"(engine {e['engine_images']}), networks {e['networks']}, replicasets "
        f"{s['cluster'].get('replicasets', '?')} | work {f['work_files']} files "
        f"{f['work_mib']} MiB, scratch {f['scratch_dirs']} | tmp {f['tmp_entries']} entries {f['tmp_files']} files "
        f"| slots {sl['slots_held']} leases {sl['lease_files']} | db {db['db_mib']} + wal {db['wal_mib']} MiB, "
        f"{db['rows'].get('flow_run', '?')} flow runs, {db['rows'].get('events', '?')} events")


# ------------------------------------------------------------------------------------ judging


def _fig(s: dict[str, Any], path: str) -> Any:
    cur: Any = s
    for k in path.split("."):
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return cur


def judge(checkpoints: list[dict[str, Any]], builds: int) -> list[dict[str, Any]]:
    """One row per figure: its value at each checkpoint, the target, and met / MISSED / info."""
    base, ref, last = checkpoints[0], checkpoints[min(1, len(checkpoints) - 1)], checkpoints[-1]
    rows: list[dict[str, Any]] = []

    def row(label: str, path: str, target: str, verdict: str | None, unit: str = "") -> None:
        rows.append({"figure": label, "path": path, "unit": unit, "target": target,
                     "values": [_fig(s, path) for s in checkpoints], "verdict": verdict or "info"})

    for name in base["parts"]:
        p = f"parts.{name}.tree_rss_mib"
        a, b = _fig(ref, p), _fig(last, p)
        growth = (b - a) / a if a and b is not None else None
        ok = growth is not None and growth < MEMORY_GROWTH_MAX
        row(f"{name}: resident memory (tree)", p, f"< +10 % from {ref['deploys']} to {last['deploys']}",
            "met" if ok else "MISSED", "MiB")
        rows[-1]["growth"] = round(growth * 100, 1) if growth is not None else None
    for name in base["shared"]:
        row(f"{name} (shared): resident memory (tree)", f"shared.{name}.tree_rss_mib", "information", None, "MiB")
    for name in base["parts"]:
        p = f"parts.{name}.fds"
        a, b = _fig(ref, p), _fig(last, p)
        ok = a is not None and b is not None and b <= a + max(5, 0.1 * a)
        row(f"{name}: open descriptors (tree)", p, f"≤ value at {ref['deploys']} + max(5, 10 %)",
            "met" if ok else "MISSED")
    for name in base["parts"]:
        p = f"parts.{name}.procs"
        row(f"{name}: processes (tree)", p, "= baseline", "met" if _fig(last, p) == _fig(base, p) else "MISSED")

    def at_base(label: str, path: str, unit: str = "") -> None:
        row(label, path, "= baseline", "met" if _fig(last, path) == _fig(base, path) else "MISSED", unit)

    at_base("containers of this stack (all states)", "engine.containers")
    at_base("containers of this stack running", "engine.containers_running")
    grown = (_fig(last, "engine.images") or 0) - (_fig(base, "engine.images") or 0)
    row("images built from this stack's sources", "engine.images", f"≤ baseline + builds ({builds})",
        "met" if grown <= builds else "MISSED")
    row("their size beyond shared layers", "engine.images_unique_mib", "information", None, "MiB")
    row("images in the engine (shared)", "engine.engine_images", "information", None)
    row("containers in the engine (shared)", "engine.engine_containers", "information", None)
    at_base("networks in the engine", "engine.networks")
    at_base("pods in the cluster", "cluster.pods")
    limit = 10 * 6  # revisionHistoryLimit (at most 10) old ones + the current, for six Deployments
    rs = _fig(last, "cluster.replicasets")
    row("ReplicaSets in the cluster", "cluster.replicasets", f"≤ {limit + 6} (revisionHistoryLimit)",
        "met" if rs is not None and rs <= limit + 6 else "MISSED")
    at_base("entries in TMPDIR", "files.tmp_entries")
    row("files under TMPDIR", "files.tmp_files", "information", None)
    at_base("scratch directories in the work dir", "files.scratch_dirs")
    row("files under the work dir", "files.work_files", "information (Git clones grow with history)", None)
    row("size of the work dir", "files.work_mib", "information", None, "MiB")
    at_base("concurrency slots held", "slots.slots_held")
    at_base("concurrency lease files", "slots.lease_files")

    # The database: size and rows per deploy over each interval; a rate that rises is not history.
    def per_deploy(path: str) -> list[float | None]:
        out: list[float | None] = []
        for a, b in zip(checkpoints, checkpoints[1:], strict=False):
            va, vb, n = _fig(a, path), _fig(b, path), b["deploys"] - a["deploys"]
            out.append(round((vb - va) / n, 4) if va is not None and vb is not None and n else None)
        return out

    size = per_deploy("db.total_mib")
    rising = None
    if len(size) >= 3 and size[1] is not None and size[-1] is not None:
        rising = size[-1] > 1.5 * max(size[1], 0.005)
    row("Prefect database + WAL", "db.total_mib", "growth per deploy not rising (last interval ≤ 1.5× the "
        "second)", None if rising is None else ("MISSED" if rising else "met"), "MiB")
    rows[-1]["per_deploy"] = size
    for t in ("flow_run", "task_run", "log", "events", "artifact"):
        row(f"rows: {t}", f"db.rows.{t}", "information (per deploy below)", None)
        rows[-1]["per_deploy"] = per_deploy(f"db.rows.{t}")
    return rows


def print_table(rows: list[dict[str, Any]], checkpoints: list[dict[str, Any]]) -> None:
    heads = [str(s["deploys"]) for s in checkpoints]
    w = max(len(r["figure"]) for r in rows) + 1
    say(f"{'figure':<{w}} " + " ".join(f"{h:>9}" for h in heads) + "   verdict  target")
    for r in rows:
        vals = " ".join(f"{'—' if v is None else (f'{v:.1f}' if isinstance(v, float) else v):>9}" for v in r["values"])
        extra = f" ({r['growth']:+.1f} %)" if r.get("growth") is not None else ""
        if r.get("per_deploy") and r["figure"].startswith(("Prefect", "rows")):
            extra = " per deploy " + ", ".join("—" if x is None else f"{x:g}" for x in r["per_deploy"])
        say(f"{r['figure']:<{w}} {vals}   {r['verdict']:<7}  {r['target']}{extra}")


# ------------------------------------------------------------------------------------ the soak


def run(ctx: Ctx, count: int, every: int, bad_every: int, env_name: str, timeout: float,
        settle: float = 5.0, idle_timeout: float = 600.0) -> dict[str, Any]:
    env = ctx.env(env_name)
    branch = env.branches[0]
    st = Stack(ctx)
    say(f"soak: {count} deploys to {env_name} (branch {branch}), every {bad_every}th a bad release; checkpoints "
        f"every {every}; processes {st.pids}, shared {st.shared}; work {st.work}, TMPDIR {st.tmp}")
    if str(st.tmp) in ("/tmp", "/var/tmp"):
        say("soak: warning: TMPDIR is the machine's; other programs' temp files will count (see the docstring)")
    repo = source_repo(ctx)
    load = LoadWatcher()
    load.start()
    checkpoints = [checkpoint(st, 0, idle_timeout, settle)]
    print_checkpoint(checkpoints[-1])
    outcomes: Counter[str] = Counter()
    unexpected: list[dict[str, Any]] = []
    good_s: list[float] = []
    bad_s: list[float] = []
    t_start = time.monotonic()
    for i in range(1, count + 1):
        bad = bad_every > 0 and i % bad_every == 0
        marker = f"bench soak {ctx.run_id} {i}"
        text = common.bad_settings_text(marker) if bad else settings_text(marker=marker)
        t0 = time.monotonic()
        pushed = push_and_deliver(ctx, repo, branch, text,
                                  f"{'fix: bench soak bad release' if bad else 'feat: bench soak'} {ctx.run_id} #{i}")
        final = wait_final(pushed["run_id"], timeout)
        (bad_s if bad else good_s).append(time.monotonic() - t0)
        result = (report_of(pushed["run_id"]) or {}).get("result", "")
        outcome = f"{final.state_name}/{result}"
        outcomes[("bad " if bad else "good ") + outcome] += 1
        want = "Failed/rolled-back" if bad else "Completed/completed"
        if outcome != want:
            unexpected.append({"deploy": i, "bad": bad, "run": final.name, "outcome": outcome,
                               "message": (final.state.message or "")[:300]})
            say(f"deploy #{i} ({'bad' if bad else 'good'}): {outcome}, expected {want}: {final.state.message}")
        if i % every == 0 or i == count:
            checkpoints.append(checkpoint(st, i, idle_timeout, settle))
            print_checkpoint(checkpoints[-1])
    duration = time.monotonic() - t_start
    load_summary = load.stop()
    builds = count  # every commit differs, so every deploy builds one image
    rows = judge(checkpoints, builds)
    missed = [r["figure"] for r in rows if r["verdict"] == "MISSED"]
    say(f"soak: {count} deploys in {duration:.0f} s ({dict(outcomes)}); load average (1 min) during the run "
        f"{common.fmt(load_summary, unit='')}")
    say(f"  good deploy, push → final: {common.fmt(common.summarize(good_s))}")
    say(f"  bad release, push → rolled back: {common.fmt(common.summarize(bad_s))}")
    print_table(rows, checkpoints)
    if unexpected:
        say(f"soak: {len(unexpected)} deploy(s) ended otherwise than expected")
    say("soak: every target met" if not missed else f"soak: MISSED: {', '.join(missed)}")
    return {"count": count, "every": every, "bad_every": bad_every, "environment": env_name,
            "outcomes": dict(outcomes), "unexpected": unexpected, "duration_s": round(duration, 1),
            "good_deploy_s": common.summarize(good_s), "bad_deploy_s": common.summarize(bad_s),
            "load_1min": load_summary, "load_readings": load.readings, "pids": st.pids, "shared_pids": st.shared,
            "work_dir": str(st.work), "tmp_dir": str(st.tmp), "checkpoints": checkpoints, "figures": rows,
            "missed": missed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=200, help="deploys in a row (default 200)")
    p.add_argument("--every", type=int, default=50, help="a checkpoint after every N deploys (default 50)")
    p.add_argument("--bad-every", type=int, default=5, help="every Nth deploy is a bad release (0: none)")
    p.add_argument("--env", default="dev", help="environment to deploy to (its first deploying branch)")
    p.add_argument("--timeout", type=float, default=600, help="seconds one deploy may take")
    p.add_argument("--settle", type=float, default=5.0, help="seconds to wait, once idle, before a checkpoint")
    p.add_argument("--idle-timeout", type=float, default=600, help="seconds a checkpoint waits for runs to end")
    p.add_argument("--out", default="soak", help="results file name under bench/results (default soak)")
    args = p.parse_args()
    ctx = common.ensure_stack(quick=args.count < 200)
    out = run(ctx, args.count, max(1, args.every), args.bad_every, args.env, args.timeout, args.settle,
              args.idle_timeout)
    out["machine"] = common.machine()
    say(f"results: {common.save(args.out, out)}")
    sys.exit(1 if out["missed"] else 0)


if __name__ == "__main__":
    main()
