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
