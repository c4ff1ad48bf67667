"""The repo-server part of the emulator: resolve a target revision to a commit SHA with
`git ls-remote` (as Argo CD does on every refresh), and render the chart at that commit with
`helm template` and the Application's values files, as Argo CD's repo-server does, from a bare cache
clone per repository. A chart that does not render is a ComparisonError worded like Argo CD's."""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import re
import shutil
import subprocess
import tarfile
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from delivery.redact import redact
from delivery.settings import PROJECT_ROOT
from sandbox.argocd.model import ComparisonError, Desired, desired_from_manifests

_SHA = re.compile(r"[0-9a-f]{40}")
_GIT_TIMEOUT = 60
_HELM_TIMEOUT = 60
# Argo CD's own prefix for a manifest that cannot be generated.
_GEN_FAILED = ("Failed to load target state: failed to generate manifest for source 1 of 1: rpc error: "
               "code = Unknown desc = Manifest generation error (cached): ")
# Renders kept; the least recently used goes first. Every app renders every new commit of its branch,
# so an unbounded cache grew with each deploy (the 200-deploy soak saw it); Argo CD's repo-server
# expires its manifest cache too (24 h by default). A render dropped is only `helm template` again.
_RENDERS_KEPT = 256


class GitSource:
    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        # A commit's render never changes: (url, sha, path, value files, release, namespace) -> Desired.
        self._renders: OrderedDict[tuple[Any, ...], Desired] = OrderedDict()

    def _git(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
        env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}
        try:
            return subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=_GIT_TIMEOUT, env=env,
                                  check=False)
        except subprocess.TimeoutExpired as e:
            raise ComparisonError(f"git {args[0]} timed out after {_GIT_TIMEOUT} s") from e

    def _repo(self, url: str) -> tuple[Path, threading.Lock]:
        key = hashlib.sha256(url.encode()).hexdigest()[:16]
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        path = self.cache_dir / key
        with lock:
            if not (path / "HEAD").exists():
                path.mkdir(parents=True, exist_ok=True)
                r = self._git("init", "--quiet", "--bare", str(path))
                if r.returncode:
                    raise ComparisonError(f"git init failed: {r.stderr.decode(errors='replace').strip()}")
        return path, lock

    def _fail(self, what: str, url: str, r: subprocess.CompletedProcess[bytes]) -> ComparisonError:
        err = redact(r.stderr.decode(errors="replace").strip())
        return ComparisonError(f"{what} {redact(url)}: {err}")

    def ls_remote(self, url: str) -> dict[str, str]:
        r = self._git("ls-remote", "--", url)
        if r.returncode:
            raise self._fail("failed to list refs of", url, r)
        refs: dict[str, str] = {}
        for line in r.stdout.decode().splitlines():
            sha, _, ref = line.partition("\t")
            refs[ref] = sha
        return refs

    def resolve(self, url: str, target: str | None) -> str:
        """A branch, tag, `HEAD` or SHA to the full commit SHA it names now."""
        target = (target or "HEAD").strip()
        if _SHA.fullmatch(target):
            self.ensure(url, target)
            return target
        refs = self.ls_remote(url)
        for ref in (target, f"refs/heads/{target}", f"refs/tags/{target}"):
            # Annotated tags: the peeled entry names the commit.
            if f"{ref}^{{}}" in refs:
                return refs[f"{ref}^{{}}"]
            if ref in refs and (ref == "HEAD" or ref.startswith("refs/")):
                return refs[ref]
        if re.fullmatch(r"[0-9a-f]{7,39}", target):
            path, lock = self._repo(url)
            with lock:
                self._fetch(url, path)
                r = self._git("rev-parse", "--verify", "--quiet", f"{target}^{{commit}}", cwd=path)
            if r.returncode == 0:
                return r.stdout.decode().strip()
        raise ComparisonError(f"unable to resolve '{target}' to a commit SHA")

    def _fetch(self, url: str, path: Path) -> None:
        r = self._git("fetch", "--quiet", "--force", "--", url,
                      "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*", cwd=path)
        if r.returncode:
            raise self._fail("failed to fetch", url, r)

    def ensure(self, url: str, sha: str, *, hard: bool = False) -> Path:
        """The cache clone of `url` holding commit `sha` (fetched when missing, or always if `hard`)."""
        path, lock = self._repo(url)
        with lock:
            present = self._git("cat-file", "-e", f"{sha}^{{commit}}", cwd=path).returncode == 0
            if hard or not present:
                self._fetch(url, path)
                if self._git("cat-file", "-e", f"{sha}^{{commit}}", cwd=path).returncode:
                    raise ComparisonError(f"revision {sha} not found in {redact(url)}")
        return path

    def tree(self, url: str, sha: str, dest: Path) -> Path:
        """The repository's files at `sha`, written under `dest` (what the repo-server checks out)."""
        repo = self.ensure(url, sha)
        r = self._git("archive", "--format=tar", sha, cwd=repo)
        if r.returncode:
            raise self._fail(f"failed to read {sha} of", url, r)
        with tarfile.open(fileobj=io.BytesIO(r.stdout)) as tar:
            tar.extractall(dest, filter="data")
        return dest

    def read(self, url: str, sha: str, path: str) -> bytes | None:
        repo = self.ensure(url, sha)
        r = self._git("cat-file", "blob", f"{sha}:{path}", cwd=repo)
        if r.returncode:
            return None
        return r.stdout


def value_files(source: Mapping[str, Any]) -> list[str]:
    """Helm always starts from the chart's values.yaml; valueFiles come on top, in order."""
    files = ["values.yaml"]
    for f in ((source.get("helm") or {}).get("valueFiles") or []):
        if f not in files:
            files.append(str(f))
    return files


def _helm() -> str:
    local = PROJECT_ROOT / ".tools" / "bin" / "helm"
    return str(local) if local.exists() else (shutil.which("helm") or "helm")


def render(git: GitSource, source: Mapping[str, Any], sha: str, *, release: str, namespace: str,
           hard: bool = False) -> Desired:
    """`helm template <release> <path> --namespace <ns> --values ...` of `source` at commit `sha`, and
    the Deployment it renders; any failure is a `ComparisonError` worded like Argo CD's."""
    url = str(source.get("repoURL") or "")
    if not url:
        raise ComparisonError("spec.source.repoURL is empty")
    if hard:
        git.ensure(url, sha, hard=True)
    chart = posixpath.normpath(str(source.get("path") or "."))
    files = value_files(source)
    key = (url, sha, chart, tuple(files), release, namespace)
    with git._guard:
        if key in git._renders:
            git._renders.move_to_end(key)
            return git._renders[key]
    with tempfile.TemporaryDirectory(prefix="render-") as tmp:
        root = git.tree(url, sha, Path(tmp))
        chart_dir = (root / chart).resolve()
        if not chart_dir.is_relative_to(root.resolve()) or not (chart_dir / "Chart.yaml").is_file():
            raise ComparisonError(f"{_GEN_FAILED}{chart}: app path does not exist or is not a Helm chart")
        argv = [_helm(), "template", release, ".", "--namespace", namespace]
        for name in files:
            argv += ["--values", name]
        shown = " ".join(argv[1:])
        try:
            r = subprocess.run(argv, cwd=chart_dir, capture_output=True, timeout=_HELM_TIMEOUT, check=False)
        except subprocess.TimeoutExpired as e:
            raise ComparisonError(f"{_GEN_FAILED}`helm {shown}` timed out after {_HELM_TIMEOUT} s") from e
        if r.returncode:
            err = " ".join(redact(r.stderr.decode(errors="replace")).split())
            raise ComparisonError(f"{_GEN_FAILED}`helm {shown}` failed exit status {r.returncode}: {err}")
        try:
            docs = [d for d in YAML(typ="safe", pure=True).load_all(r.stdout.decode("utf-8", "replace"))
                    if isinstance(d, Mapping)]
        except YAMLError as e:
            raise ComparisonError(f"{_GEN_FAILED}the rendered manifests are not YAML: "
                                  f"{' '.join(str(e).split())}") from e
    desired = desired_from_manifests(docs)
    with git._guard:
        git._renders[key] = desired
        while len(git._renders) > _RENDERS_KEPT:
            git._renders.popitem(last=False)
    return desired
