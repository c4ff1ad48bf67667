"""helm and kubectl from .tools/bin, and small helpers to render the chart and the Argo CD overlays."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TOOLS = PROJECT_ROOT / ".tools" / "bin"
CHART = PROJECT_ROOT / "helm" / "workout-api"
ARGOCD = PROJECT_ROOT / "argocd"
ENVIRONMENTS = ("dev", "staging", "prod")


def _tool(name: str) -> Path:
    exe = TOOLS / name
    if not exe.exists():
        pytest.fail(f"{exe} is missing: run `make setup` to install helm and kubectl", pytrace=False)
    return exe


@pytest.fixture(scope="session")
def helm() -> Path:
    return _tool("helm")


@pytest.fixture(scope="session")
def kubectl() -> Path:
    return _tool("kubectl")


def run(argv: list[str | Path], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, argv))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def values_args(env: str | None) -> list[str]:
    """Argo CD passes values.yaml then values-<env>.yaml, in that order."""
    args = ["-f", str(CHART / "values.yaml")]
    if env:
        args += ["-f", str(CHART / f"values-{env}.yaml")]
    return args


def render(helm: Path, env: str | None = None, *, sets: dict[str, str] | None = None,
           namespace: str = "woodez-database") -> list[dict]:
    """`helm template workout-api` as Argo CD runs it (release name workout-api), parsed into objects."""
    argv: list[str | Path] = [helm, "template", "workout-api", CHART, "--namespace", namespace, *values_args(env)]
    for key, value in (sets or {}).items():
        argv += ["--set", f"{key}={value}"]
    out = run(argv).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o.get("kind") == kind]


def kustomize(kubectl: Path, path: Path) -> list[dict]:
    out = run([kubectl, "kustomize", path]).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]
