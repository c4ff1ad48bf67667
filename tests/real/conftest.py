"""The real tier for the end-to-end story: a one-node Kubernetes and Argo CD core mode built from the Go
modules (`delivery sandbox up --real`), in a directory of this session's own. Selected by `-m real`
(`make test-real`); the first run builds the binaries (minutes), later ones start from the cache."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from delivery.settings import get_settings
from tests.fixtures_sandbox import _restore_env, _set_env, free_port_block

# Short enough that a release that never becomes ready is judged within the tests' waits; the chart's
# own default (600 s) is what a real team keeps.
PROGRESS_DEADLINE = 30


@pytest.fixture(scope="session")
def real(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> Iterator[object]:
    from sandbox.manager import Sandbox

    root = tmp_path_factory.mktemp("real-sandbox")
    sb = Sandbox(root, prefect=False, reconcile_interval=180, progress_deadline=PROGRESS_DEADLINE, real=True,
                 app_port_base=free_port_block())
    try:
        state = sb.up()
    except BaseException:
        sb.down()
        raise
    old = _set_env({"DELIVERY_SANDBOX_DIR": str(state.root), "DELIVERY_CONFIG_FILE": str(state.config_file),
                    "DELIVERY_KUBECONFIG": str(state.kubeconfig), "DELIVERY_WORK_DIR": str(root / "work")})
    get_settings.cache_clear()
    try:
        yield state
    finally:
        _restore_env(old)
        sb.down()
