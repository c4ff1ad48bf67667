"""Nothing the pipeline starts listens beyond the machine by default: the webhook receiver and the
sandbox's parts bind to 127.0.0.1 (read from the kernel's socket tables, not from our own config)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from delivery.settings import PROJECT_ROOT
from sandbox.manager import free_port

BIND_SECRET = "bind-test-secret"  # secret-scan: allow

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _addr(hex_addr: str) -> str:
    ip, port = hex_addr.split(":")
    raw = bytes.fromhex(ip)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def listening() -> list[tuple[str, int, str]]:
    """(address, port, socket inode) of every listening TCP socket on the machine."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A":
                out.append((_addr(f[1]), int(f[1].split(":")[1], 16), f[9]))
    return out


def addresses_on(port: int) -> set[str]:
    return {a for a, p, _ in listening() if p == port}


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def test_webhook_receiver_binds_loopback_by_default(tmp_path: Path) -> None:
    """`delivery webhook serve` without --host listens on 127.0.0.1 only."""
    port = free_port()
    env = {**os.environ, "DELIVERY_WEBHOOK_SECRET": BIND_SECRET, "PYTHONPATH": str(PROJECT_ROOT),
           "DELIVERY_CONFIG_FILE": str(tmp_path / "none.yaml")}
    exe = Path(sys.executable).with_name("delivery")
    with open(tmp_path / "receiver.log", "wb") as log:
        proc = subprocess.Popen([str(exe), "webhook", "serve", "--port", str(port)], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not addresses_on(port) and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "receiver.log").read_text()
            time.sleep(0.2)
        assert addresses_on(port) == {"127.0.0.1"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.docker
@pytest.mark.sandbox
def test_sandbox_parts_bind_loopback(sandbox) -> None:
    """The Kubernetes API and Argo CD emulators, the apps' ports and the registry listen on loopback only."""
    kube_port = urlsplit(sandbox.kube_url).port
    assert kube_port and addresses_on(kube_port) and addresses_on(kube_port) <= LOOPBACK
    assert addresses_on(5000) and addresses_on(5000) <= LOOPBACK
    for app, port in sandbox.ports.items():
        deadline = time.monotonic() + 60
        while not addresses_on(port) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert addresses_on(port) and addresses_on(port) <= LOOPBACK, (app, addresses_on(port))
    # Whatever else the emulator processes listen on, it is loopback too.
    table = {inode: addr for addr, _, inode in listening()}
    for name, pid in sandbox.pids.items():
        addrs = {table[i] for i in socket_inodes(pid) if i in table}
        assert addrs <= LOOPBACK, (name, addrs)
