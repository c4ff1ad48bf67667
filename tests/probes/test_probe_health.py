"""`probe_health` against a real busybox httpd container answering a health JSON on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import docker
import pytest

from delivery.errors import HealthCheckFailed
from tasks.probes import HealthAnswer, _proxy_target, parse_kube_proxy_url, probe_health

pytestmark = pytest.mark.docker

BASE_IMAGE = "local/busybox:stable"

# A health document rewritten in place, and a CGI script that fails like a broken app does.
SETUP = r"""
set -e
mkdir -p /www/api/health /www/cgi-bin
printf '%s' "$HEALTH" > /www/api/health/index.html
cat > /www/cgi-bin/health <<'EOS'
#!/bin/sh
echo "Status: 500 Internal Server Error"
echo "Content-Type: application/json"
echo ""
echo '{"status": "error", "detail": "database connection refused"}'
EOS
chmod +x /www/cgi-bin/health
exec httpd -f -p 8080 -h /www
"""


class HealthServer:
    def __init__(self, container, port: int) -> None:
        self.container = container
        self.base = f"http://127.0.0.1:{port}"

    def set_version(self, version: str) -> None:
        body = json.dumps({"status": "ok", "version": version})
        # Write-then-rename, so that no probe ever reads a half-written file.
        rc, out = self.container.exec_run(["sh", "-c", 'printf "%s" "$1" > /www/api/health/.new && '
                                           'mv /www/api/health/.new /www/api/health/index.html', "sh", body])
        assert rc == 0, out


def _wait_answering(url: str, timeout: float = 30) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


@pytest.fixture(scope="module")
def health_server() -> Iterator[HealthServer]:
    docker_client = docker.from_env()
    container = docker_client.containers.run(
        BASE_IMAGE, ["sh", "-c", SETUP], name=f"probe-test-{uuid.uuid4().hex[:8]}", detach=True,
        environment={"HEALTH": json.dumps({"status": "ok", "version": "1.0.0"})},
        ports={"8080/tcp": ("127.0.0.1", None)}, labels={"delivery.test": "probes"})
    try:
        deadline = time.monotonic() + 30
        port = None
        while port is None and time.monotonic() < deadline:
            container.reload()
            bindings = (container.attrs["NetworkSettings"]["Ports"] or {}).get("8080/tcp")
            port = int(bindings[0]["HostPort"]) if bindings else None
            if port is None:
                time.sleep(0.1)
        assert port, "no host port published"
        server = HealthServer(container, port)
        _wait_answering(server.base + "/api/health/")
        yield server
    finally:
        container.remove(force=True)
        docker_client.close()


def test_expected_version_passes(health_server: HealthServer) -> None:
    """The expected version answered three times in a row passes and reports what was seen."""
    health_server.set_version("1.0.0")
    answer = probe_health(health_server.base + "/api/health/", expect_version="1.0.0", interval=0.1, timeout=30)
    assert isinstance(answer, HealthAnswer)
    assert (answer.status_code, answer.version, answer.successes) == (200, "1.0.0", 3)
    assert answer.body == {"status": "ok", "version": "1.0.0"}


def test_old_version_keeps_waiting_then_fails_naming_it(health_server: HealthServer,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """An app still answering the old version ends in HealthCheckFailed naming it; the log says so once."""
    health_server.set_version("1.0.0")
    caplog.set_level(logging.INFO, logger="delivery")
    with pytest.raises(HealthCheckFailed) as exc:
        probe_health(health_server.base + "/api/health/", expect_version="2.0.0", interval=0.2, timeout=2)
    assert "'1.0.0'" in str(exc.value) and "'2.0.0'" in str(exc.value)
    assert len([r for r in caplog.records if "version '1.0.0'" in r.getMessage()]) == 1


def test_http_500_fails_with_the_body(health_server: HealthServer) -> None:
    """A 500 answer is never healthy, and the error shows its status and body."""
    with pytest.raises(HealthCheckFailed) as exc:
        probe_health(health_server.base + "/cgi-bin/health", expect_version="1.0.0", interval=0.2, timeout=2)
    assert "HTTP 500" in str(exc.value)
    assert "database connection refused" in str(exc.value)


def test_version_switch_mid_probe_passes(health_server: HealthServer) -> None:
    """When the new version starts answering during the probe, the probe passes after the switch."""
    health_server.set_version("1.0.0")
    t = threading.Timer(1.0, health_server.set_version, args=("3.1.0",))
    t.start()
    try:
        answer = probe_health(health_server.base + "/api/health/", expect_version="3.1.0", interval=0.2,
                              timeout=60)
    finally:
        t.join()
    assert answer.version == "3.1.0" and answer.successes == 3


def test_connection_refused_fails_with_the_error() -> None:
    """Nothing listening: the probe retries until its timeout, then says the connection failed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(HealthCheckFailed, match="ConnectError"):
        probe_health(f"http://127.0.0.1:{port}/api/health/", expect_version="1", interval=0.2, timeout=1)


def test_kube_proxy_target_goes_through_the_api_server(tmp_path) -> None:
    """A `kube-proxy://` health URL is reached from the kubeconfig's server, with its bearer token as header."""
    import json
    import secrets

    bearer = secrets.token_hex(8)  # made at run time: no token-shaped literal in the repository
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": "http://127.0.0.1:6443"}}],
        "users": [{"name": "u", "user": {"token": bearer}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}))
    target = _proxy_target("workout-dev", "workout-api", "80", "/api/health/", kubeconfig)
    url, headers = target.url, target.headers
    assert url == "http://127.0.0.1:6443/api/v1/namespaces/workout-dev/services/workout-api:80/proxy/api/health/"
    assert headers == {"authorization": f"Bearer {bearer}"}
    assert parse_kube_proxy_url("kube-proxy://workout-dev/workout-api:http/api/health/") == (
        "workout-dev", "workout-api", "http", "/api/health/")
    with pytest.raises(HealthCheckFailed, match="bad service proxy URL"):
        parse_kube_proxy_url("kube-proxy://workout-dev/workout-api/api/health/")


class _Flapping:
    """An app whose answers follow `versions` in a cycle: a release that is not stable."""

    def __init__(self, versions: list[str]) -> None:
        import http.server

        self.versions = versions
        self.count = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                version = outer.versions[outer.count % len(outer.versions)]
                outer.count += 1
                body = json.dumps({"status": "ok", "version": version}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/health/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("versions", [["2.0.0", "2.0.0", "1.0.0"], ["2.0.0", "1.0.0", "1.0.0", "1.0.0"]])
def test_flapping_or_one_off_answer_is_not_verified(versions: list[str]) -> None:
    """An app that answers the new version only now and then (flapping, or a one-off) is never verified, even
    though the confirming answers are taken quickly once the new version shows."""
    app = _Flapping(versions)
    try:
        with pytest.raises(HealthCheckFailed) as exc:
            probe_health(app.url, expect_version="2.0.0", interval=0.05, confirm_interval=0.05, timeout=1.5)
    finally:
        app.close()
    assert "3 times in a row" in str(exc.value)
    assert app.count >= 10


def test_healthy_app_is_confirmed_with_few_requests() -> None:
    """A healthy app is verified with exactly `successes` requests, no waiting between failed tries."""
    app = _Flapping(["2.0.0"])
    try:
        answer = probe_health(app.url, expect_version="2.0.0", timeout=30)
    finally:
        app.close()
    assert (answer.successes, app.count) == (3, 3)
