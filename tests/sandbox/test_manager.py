"""The sandbox manager: `up` brings the parts up once, records them, seeds the repositories, the image
and the Applications; `down` stops exactly what it started."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import docker
import pytest
from kubernetes import client, config
from ruamel.yaml import YAML

from delivery.config import load_config
from sandbox.manager import ENVIRONMENTS, IMAGE_REPOSITORY, SECOND_APP, Sandbox, SandboxState, cli
from tasks.images import image_exists
from tests.fixtures_sandbox import free_port_block

pytestmark = [pytest.mark.docker, pytest.mark.sandbox]


def same_sandbox(state: SandboxState) -> Sandbox:
    return Sandbox(state.root, prefect=False,
                   app_port_base=min(state.ports.values()) - 1)


def git_show(repo: Path, spec: str) -> str:
    return subprocess.run(["git", "show", spec], cwd=repo, capture_output=True, text=True, check=True).stdout


def pid_running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def our_containers(root: Path) -> list[str]:
    d = docker.from_env()
    try:
        return [c.name for c in d.containers.list(all=True, filters={"label": f"delivery.sandbox/root={root}"})]
    finally:
        d.close()


def test_up_again_is_harmless(sandbox: SandboxState) -> None:
    """A second `up` reuses the running parts: same processes, same addresses, same initial tag."""
    again = same_sandbox(sandbox).up()
    assert again.pids == sandbox.pids
    assert {"kube", "argocd"} <= set(again.pids)
    assert again.kube_url == sandbox.kube_url and again.initial_tag == sandbox.initial_tag


def test_status_reports_every_part_healthy(sandbox: SandboxState) -> None:
    """`status` lists each part with its address and finds the core parts answering."""
    rows = {r.name: r for r in same_sandbox(sandbox).status()}
    for name in ("dockerd", "registry", "git", "kube", "argocd"):
        assert rows[name].healthy, rows[name]
    assert rows["kube"].address == sandbox.kube_url and rows["kube"].pid == sandbox.pids["kube"]
    assert "prefect" not in rows


def test_cli_status_reads_the_sandbox_from_the_settings(sandbox: SandboxState,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`delivery sandbox status` finds the sandbox through DELIVERY_SANDBOX_DIR and exits 0."""
    assert os.environ["DELIVERY_SANDBOX_DIR"] == str(sandbox.root)
    assert cli("status") == 0
    out = capsys.readouterr().out
    assert sandbox.kube_url in out and "answering" in out


def _root_commit(repo, branch: str = "main") -> str:
    out = subprocess.run(["git", "rev-list", "--max-parents=0", branch], cwd=repo, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[-1]


def test_gitops_repo_is_seeded_for_the_sandbox(sandbox: SandboxState) -> None:
    """The GitOps remote holds the chart pointed at the sandbox registry and pinned to the initial tag."""
    yaml = YAML(typ="safe")
    # The seeded commit is the root of main: other tests deploy on top of it in the same session.
    seed = _root_commit(sandbox.gitops_remote)
    values = yaml.load(git_show(sandbox.gitops_remote, f"{seed}:helm/workout-api/values.yaml"))
    assert values["image"]["repository"] == IMAGE_REPOSITORY == f"{sandbox.registry}/workout-api"
    # The chart's own production deadline: a broken release is caught from its pods, not by a short deadline.
    assert values["progressDeadlineSeconds"] == 600
    for env in ENVIRONMENTS:
        text = git_show(sandbox.gitops_remote, f"{seed}:helm/workout-api/values-{env.name}.yaml")
        assert yaml.load(text)["image"]["tag"] == sandbox.initial_tag
        assert f'tag: "{sandbox.initial_tag}"' in text, "the tag line keeps its quoting"
    assert "kind: Kustomization" in git_show(sandbox.gitops_remote, f"{seed}:argocd/overlays/dev/kustomization.yaml")


def test_source_repo_has_main_and_release_dev_at_the_initial_commit(sandbox: SandboxState) -> None:
    """The sample app's remote has `main` and `release-dev` grown from one root commit, which names the initial tag."""
    heads = subprocess.run(["git", "for-each-ref", "--format=%(refname:short) %(objectname)", "refs/heads"],
                           cwd=sandbox.source_remote, capture_output=True, text=True, check=True).stdout.split("\n")
    refs = dict(line.split() for line in heads if line)
    assert set(refs) == {"main", "release-dev"}
    root = _root_commit(sandbox.source_remote, "main")
    assert root == _root_commit(sandbox.source_remote, "release-dev")
    assert sandbox.initial_tag == f"main-{root[:7]}"
    assert "Dockerfile" in git_show(sandbox.source_remote, f"{root}:").split()


def test_initial_image_is_in_the_registry(sandbox: SandboxState) -> None:
    """The initial image was built and pushed, so Argo CD can deploy the seeded tag."""
    assert image_exists(IMAGE_REPOSITORY, sandbox.initial_tag)


def test_applications_point_at_the_sandbox_remote(sandbox: SandboxState) -> None:
    """dev, staging and prod Applications exist with their repoURL rewritten to the local GitOps remote."""
    with config.new_client_from_config(config_file=str(sandbox.kubeconfig)) as api:
        apps = client.CustomObjectsApi(api).list_namespaced_custom_object(
            "argoproj.io", "v1alpha1", "argocd", "applications")["items"]
        namespaces = {n.metadata.name for n in client.CoreV1Api(api).list_namespace().items}
    by_name = {a["metadata"]["name"]: a for a in apps}
    for env in ENVIRONMENTS:
        app = by_name[env.application]
        assert app["spec"]["source"]["repoURL"] == str(sandbox.gitops_remote)
        assert app["spec"]["destination"]["namespace"] == env.namespace
        assert f"values-{env.name}.yaml" in app["spec"]["source"]["helm"]["valueFiles"]
        assert env.namespace in namespaces
    assert "argocd" in namespaces


def test_config_file_describes_the_sandbox(sandbox: SandboxState) -> None:
    """delivery.yaml loads and routes refs to the environments on the sandbox's ports and remotes."""
    app = load_config(sandbox.config_file).app("workout-api")
    assert app.source_repo == str(sandbox.source_remote) and app.gitops_repo == str(sandbox.gitops_remote)
    assert app.image == IMAGE_REPOSITORY and app.chart_path == "helm/workout-api"
    assert [e.name for e in app.environments_for_ref("refs/heads/release-dev")] == ["dev"]
    assert [e.name for e in app.environments_for_ref("refs/heads/main")] == ["staging"]
    assert [e.name for e in app.environments_for_ref("refs/tags/v1.2.3")] == ["prod"]
    dev = app.environment("dev")
    assert dev.health_url == f"http://127.0.0.1:{sandbox.ports['workout-api-dev']}/api/health/"
    assert dev.namespace == "woodez-database-dev" and dev.deployment == "workout-api"
    assert app.build_args == {"BASE_IMAGE": "local/busybox:stable"}, "the sandbox has no Docker Hub"


def _version_within(url: str, seconds: float) -> str | None:
    """The version `url` answers with, waiting up to `seconds` for Argo CD to start the app."""
    deadline, last = time.monotonic() + seconds, None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.loads(r.read())["version"]
        except OSError as e:
            last = e
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds:g} s: {last}")


def test_second_app_shares_the_gitops_repo_with_the_same_environment_names(sandbox: SandboxState) -> None:
    """nutrition-api: its own source repository, image, chart directory in the same GitOps repository,
    Applications, namespaces and ports; the same three environment names as workout-api; and it answers."""
    cfg = load_config(sandbox.config_file)
    a, b = cfg.app("workout-api"), cfg.app(SECOND_APP)
    assert b.gitops_repo == a.gitops_repo == str(sandbox.gitops_remote)
    assert b.source_repo == str(sandbox.source_remotes[SECOND_APP]) != a.source_repo
    assert b.chart_path == "helm/nutrition-api" and b.image == f"{sandbox.registry}/nutrition-api"
    assert sorted(b.environments) == sorted(a.environments) == ["dev", "prod", "staging"]
    seed = _root_commit(sandbox.gitops_remote)
    for env in b.environments.values():
        assert env.application == f"nutrition-api-{env.name}"
        text = git_show(sandbox.gitops_remote, f"{seed}:helm/nutrition-api/values-{env.name}.yaml")
        assert YAML(typ="safe").load(text)["image"]["tag"] == sandbox.initial_tags[SECOND_APP]
        assert env.health_url not in {e.health_url for e in a.environments.values()}
        assert env.namespace not in {e.namespace for e in a.environments.values()}
        # Other tests of the session may have deployed it since: it serves what Git names now.
        now = YAML(typ="safe").load(git_show(sandbox.gitops_remote, f"main:helm/nutrition-api/values-{env.name}.yaml"))
        assert _version_within(env.health_url, 90) == now["image"]["tag"]
    assert image_exists(b.image, sandbox.initial_tags[SECOND_APP])


def test_down_stops_exactly_what_up_started(sandbox: SandboxState, tmp_path: Path) -> None:
    """`down` leaves no process or container of its sandbox behind, and leaves other sandboxes alone."""
    sb = Sandbox(tmp_path / "other", prefect=False,
                 app_port_base=free_port_block())
    try:
        state = sb.up()
        # Wait for the Argo CD emulator to run the dev app, so there is a container to clean up.
        url = f"http://127.0.0.1:{state.ports['workout-api-dev']}/api/health/"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if state.initial_tag.encode() in r.read():
                        break
            except OSError:
                pass
            time.sleep(0.5)
        assert our_containers(state.root), "the Argo CD emulator started no container"
    finally:
        sb.down()

    assert not any(pid_running(pid) for pid in state.pids.values())
    assert our_containers(state.root) == []
    # The session sandbox is untouched.
    assert all(pid_running(pid) for pid in sandbox.pids.values())
    assert {r.name: r.healthy for r in same_sandbox(sandbox).status()}["kube"]

    sb.reset()
    assert not state.root.exists()
