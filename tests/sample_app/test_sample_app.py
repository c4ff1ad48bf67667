"""The sample workout API builds, pushes, runs and reports its version; its knobs make bad releases."""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from sandbox.engine import BASE_IMAGE, REGISTRY_ADDR, ensure_base_image, registry_ok

pytestmark = pytest.mark.docker

PROJECT_ROOT = Path(__file__).resolve().parents[2]
APP_SOURCE = PROJECT_ROOT / "examples" / "workout-api"


@pytest.fixture(scope="module")
def client() -> Iterator[docker.DockerClient]:
    c = docker.from_env(timeout=120)
    ensure_base_image()
    if not registry_ok():
        pytest.fail(f"no registry answers on {REGISTRY_ADDR}: run `make setup`", pytrace=False)
    yield c
    c.close()


@pytest.fixture(scope="module")
def repo_name() -> str:
    return f"{REGISTRY_ADDR}/test-sample-app-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def containers(client) -> Iterator[list]:
    started: list = []
    yield started
    for ctr in started:
        try:
            ctr.remove(force=True)
        except docker.errors.NotFound:
            pass


def build_and_push(client: docker.DockerClient, context: Path, repo: str, version: str) -> str:
    ref = f"{repo}:{version}"
    client.images.build(path=str(context), tag=ref, rm=True, forcerm=True,
                        buildargs={"BASE_IMAGE": BASE_IMAGE, "APP_VERSION": version})
    for line in client.images.push(repo, tag=version, stream=True, decode=True):
        assert "error" not in line, line
    return ref


def start(client: docker.DockerClient, ref: str, containers: list):
    ctr = client.containers.run(ref, detach=True, ports={"8000/tcp": ("127.0.0.1", None)})
    containers.append(ctr)
    return ctr


def host_port(ctr) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ctr.reload()
        bindings = (ctr.attrs["NetworkSettings"]["Ports"] or {}).get("8000/tcp")
        if bindings:
            return int(bindings[0]["HostPort"])
        if ctr.status == "exited":
            break
        time.sleep(0.2)
    raise AssertionError(f"port 8000 was not published; status {ctr.status}, logs: {ctr.logs()[-500:]!r}")


def get(port: int, path: str, timeout: float = 30) -> tuple[int, str, dict | list]:
    """GET until the server answers at all (it needs a moment to start); any HTTP status counts."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                return resp.status, resp.headers.get("Content-Type", ""), json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Content-Type", ""), json.loads(e.read())
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            last = e
            time.sleep(0.3)
    raise AssertionError(f"no answer from 127.0.0.1:{port}{path} within {timeout:.0f} s: {last}")


def variant_source(tmp_path: Path, **knobs: str) -> Path:
    """A copy of the app source with settings.env knobs changed, as a commit would change them."""
    src = tmp_path / "workout-api"
    shutil.copytree(APP_SOURCE, src)
    settings = src / "app" / "settings.env"
    lines = settings.read_text().splitlines()
    for key, value in knobs.items():
        lines = [f"{key}={value}" if ln.startswith(f"{key}=") else ln for ln in lines]
    settings.write_text("\n".join(lines) + "\n")
    return src


@pytest.fixture(scope="module")
def good_image(client, repo_name) -> Iterator[tuple[str, str]]:
    version = f"v{uuid.uuid4().hex[:8]}"
    ref = build_and_push(client, APP_SOURCE, repo_name, version)
    yield ref, version
    client.images.remove(ref, force=True)


def test_pushed_image_is_in_the_registry(good_image):
    """The built image is pushed: the registry serves its manifest under the version tag."""
    ref, version = good_image
    repo = ref.removeprefix(f"{REGISTRY_ADDR}/").rsplit(":", 1)[0]
    req = urllib.request.Request(
        f"http://{REGISTRY_ADDR}/v2/{repo}/manifests/{version}", method="HEAD",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json, "
                           "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


def test_health_reports_ok_and_version(client, good_image, containers):
    """GET /api/health/ answers 200 JSON with status ok and the APP_VERSION the image was built with."""
    ref, version = good_image
    port = host_port(start(client, ref, containers))
    status, ctype, body = get(port, "/api/health/")
    assert status == 200
    assert ctype.startswith("application/json")
    assert body == {"status": "ok", "version": version}


def test_workouts_endpoint_lists_workouts(client, good_image, containers):
    """GET /api/workouts/ answers a JSON list; unknown API paths answer 404."""
    ref, _ = good_image
    port = host_port(start(client, ref, containers))
    status, _, body = get(port, "/api/workouts/")
    assert status == 200
    assert isinstance(body, list) and body and {"id", "name"} <= set(body[0])
    status, _, _ = get(port, "/api/nope/")
    assert status == 404


def test_unhealthy_release_answers_500(client, repo_name, containers, tmp_path):
    """A source commit setting HEALTHY=false yields an image whose /api/health/ answers 500 with a reason."""
    version = f"v{uuid.uuid4().hex[:8]}-unhealthy"
    ref = build_and_push(client, variant_source(tmp_path, HEALTHY="false"), repo_name, version)
    try:
        port = host_port(start(client, ref, containers))
        status, ctype, body = get(port, "/api/health/")
        assert status == 500
        assert ctype.startswith("application/json")
        assert body["status"] == "error" and body["version"] == version and body["reason"]
    finally:
        client.images.remove(ref, force=True)


def test_crash_on_start_release_exits_non_zero(client, repo_name, containers, tmp_path):
    """A source commit setting CRASH_ON_START=true yields a container that exits 1 at start."""
    version = f"v{uuid.uuid4().hex[:8]}-crash"
    ref = build_and_push(client, variant_source(tmp_path, CRASH_ON_START="true"), repo_name, version)
    try:
        ctr = client.containers.run(ref, detach=True)
        containers.append(ctr)
        result = ctr.wait(timeout=60)
        assert result["StatusCode"] == 1
        assert b"CRASH_ON_START" in ctr.logs()
    finally:
        client.images.remove(ref, force=True)
