"""The real tier for the end-to-end story: a one-node Kubernetes and Argo CD core mode built from the Go
modules (`delivery sandbox up --real`), in a directory of this session's own. Selected by `-m real`
(`make test-real`); the first run builds the binaries (minutes), later ones start from the cache."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fixtures_sandbox import free_port_block, running


@pytest.fixture(scope="session")
def real(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> Iterator[object]:
    from sandbox.manager import Sandbox

    root = tmp_path_factory.mktemp("real-sandbox")
    sb = Sandbox(root, prefect=False, reconcile_interval=180, real=True,
                 app_port_base=free_port_block())
    with running(sb, {"DELIVERY_WORK_DIR": str(root / "work")}) as state:
        yield state


@pytest.fixture
def capture(real):
    """`with capture(scenario, app, env):` records the Application and Deployment statuses the real
    Argo CD and controller-manager write meanwhile; with DELIVERY_RECORD_CAPTURES=1 they are saved
    as tests/data/captures/<scenario>.json, the data the emulator comparison tests check against."""
    import os
    from contextlib import contextmanager

    from delivery.config import load_config
    from sandbox.real import RealCluster
    from tasks.kube import api_client
    from tests.captures import StatusRecorder, save

    @contextmanager
    def record(scenario: str, app: str, env: str) -> Iterator[StatusRecorder]:
        e = load_config().app(app).environment(env)
        with StatusRecorder(api_client(), e.application, e.argocd_namespace, e.deployment, e.namespace) as r:
            yield r
        docs = r.documents()
        assert any(d["kind"] == "application" for d in docs), "the recorder saw no Application status"
        if os.environ.get("DELIVERY_RECORD_CAPTURES") == "1":
            save(scenario, docs, RealCluster(real.root / "real")._load().get("versions", {}))

    return record
