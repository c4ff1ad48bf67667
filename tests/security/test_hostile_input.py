"""Hostile input from webhooks: random headers and bodies, huge and deeply nested JSON, and ref names
built to act as shell, paths or options. The receiver answers below 500 and stays up; a ref either
is refused with a reason or becomes a valid Docker tag and a valid Git ref; nothing reaches a shell."""

from __future__ import annotations

import ast
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from delivery.errors import ConfigError
from delivery.settings import PROJECT_ROOT
from deployments.webhook import create_app
from tasks.images import image_tags
from tests.webhook.helpers import SECRET, RecordingStarter, ServerThread, make_config, payload, signed_headers

# What the other tests of the receiver do not send: ref names meant as shell, paths and options.
HOSTILE_NAMES = [
    "main; rm -rf /", "../../etc/passwd", "$(id)", "`id`", "--upload-pack=x", "-x", "a" * 300, "é" * 200,
    "feature/ünïcödé", "release/2024\u202eexe.txt", "x\x00y", "x\ny", "x y", "x|y", "x&&y", "x>y", "~1", "x^", "x:y",
    "x?", "x*", "x[", "x\\y", "@{-1}", "@", "x.lock", ".hidden", "x/", "x//y", "x..y", "v1.2.3;reboot",
    "v1.2.3/../../x", "v9.9.9$(id)", "日本語", "\U0001f600", "a" * 245, "release-dev;id",
]
NAMES = st.sampled_from(HOSTILE_NAMES) | st.text(max_size=80) | st.text(
    alphabet=st.sampled_from(list("ab/.-_;$()`|&<>'\" \\\n@{}~^:?*[v19")), max_size=40)
REFS = st.builds(lambda prefix, name: prefix + name,
                 st.sampled_from(["refs/heads/", "refs/tags/", "refs/tags/v1.2.", "refs/heads/release-dev", ""]),
                 NAMES)
SHA = "9c2b5e0e0e6f1a4d1f6c8a2b3c4d5e6f7a8b9c0d"


def git_accepts(ref: str) -> bool:
    return subprocess.run(["git", "check-ref-format", ref], capture_output=True, check=False).returncode == 0


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[ServerThread, RecordingStarter]]:
    starter = RecordingStarter()
    app = create_app(secret=SECRET, config_loader=make_config, starter=starter)
    with ServerThread(app) as server:
        yield server, starter


def _post(server: ServerThread, body: bytes, **kw: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/webhooks/github", content=body, headers=signed_headers(body, **kw), timeout=60)


@given(ref=REFS)
@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_hostile_refs_refused_or_made_safe(receiver: tuple[ServerThread, RecordingStarter], ref: str) -> None:
    """A signed push of a configured repo with a hostile ref: refused with a reason, or a safe tag and ref."""
    server, starter = receiver
    p = payload("push_tag.json" if ref.startswith("refs/tags/") else "push_branch.json")
    p["ref"], p["after"] = ref, SHA
    before = len(starter.calls)
    r = _post(server, json.dumps(p).encode())
    assert r.status_code < 500, r.text
    answer = r.json()
    if answer["status"] == "refused":
        assert r.status_code == 400 and answer.get("reason"), answer
    for requests in starter.calls[before:]:
        for req in requests:
            # Whatever is let through is a ref git itself accepts and yields valid Docker tags.
            assert git_accepts(req.source_ref) and not req.source_ref.split("/", 2)[-1].startswith("-")
            for tag in image_tags(req.source_ref, req.source_sha, "main"):
                assert len(tag) <= 128 and tag[0] not in ".-" and all(c.isascii() for c in tag), tag


@given(name=NAMES)
@settings(max_examples=300, deadline=None, database=None)
def test_image_tags_of_any_name_are_valid_docker_tags(name: str) -> None:
    """Any branch name gives valid Docker tags (or a ConfigError saying why), never an option-like tag."""
    import re

    try:
        tags = image_tags(name, SHA, "main")
    except ConfigError as e:
        assert str(e)
        return
    for tag in tags:
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", tag), tag


@pytest.mark.parametrize("ref", [
    "refs/heads/main; rm -rf /", "refs/heads/../../etc/passwd", "refs/heads/$(id)", "refs/heads/" + "a" * 260,
    "refs/heads/--upload-pack=x", "refs/tags/--upload-pack=x", "refs/heads/x\u0000y",
])
def test_listed_hostile_refs_are_400_with_reason(receiver: tuple[ServerThread, RecordingStarter], ref: str) -> None:
    """The classic hostile refs are refused with a 400 that says what is wrong; nothing is started."""
    server, starter = receiver
    before = len(starter.calls)
    p = payload("push_branch.json")
    p["ref"] = ref
    r = _post(server, json.dumps(p).encode())
    assert r.status_code == 400 and r.json()["status"] == "refused" and "ref" in r.json()["reason"]
    assert len(starter.calls) == before


def test_huge_and_deep_json_over_http(receiver: tuple[ServerThread, RecordingStarter]) -> None:
    """Very deep nesting, a body at the size cap, and one above it: 4xx, no run, the receiver still answers."""
    server, starter = receiver
    before = len(starter.calls)
    deep = b'{"a":' * 50_000 + b"1" + b"}" * 50_000
    wide = json.dumps({"ref": "refs/heads/main", "junk": ["x" * 1000] * 20_000}).encode()
    for body in (deep, wide, b"[" * 200_000 + b"]" * 200_000):
        r = _post(server, body)
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])
    assert len(starter.calls) == before
    assert httpx.get(f"{server.url}/healthz", timeout=30).status_code < 500


SHELL_CALLS = {("os", "system"), ("os", "popen"), ("os", "execl"), ("os", "execlp"), ("os", "spawnl"),
               ("subprocess", "getoutput"), ("subprocess", "getstatusoutput")}
SUBPROCESS_FNS = {"run", "Popen", "call", "check_call", "check_output"}


def _product_files() -> list[Path]:
    return [p for top in ("delivery", "tasks", "flows", "deployments", "sandbox")
            for p in sorted((PROJECT_ROOT / top).rglob("*.py"))]


def test_no_subprocess_goes_through_a_shell() -> None:
    """No product code uses shell=True, os.system/popen, or hands subprocess one command string."""
    found = []
    for path in _product_files():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            where = f"{path.relative_to(PROJECT_ROOT)}:{node.lineno}"
            for kw in node.keywords:
                if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    found.append(f"{where} shell={ast.unparse(kw.value)}")
            f = node.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                if (f.value.id, f.attr) in SHELL_CALLS:
                    found.append(f"{where} {f.value.id}.{f.attr}")
                if f.value.id == "subprocess" and f.attr in SUBPROCESS_FNS and node.args:
                    first = node.args[0]
                    if isinstance(first, (ast.Constant, ast.JoinedStr, ast.BinOp)):
                        found.append(f"{where} subprocess.{f.attr} with a command string")
    assert _product_files() and not found, found
