"""Fixtures for the Argo CD tasks: a Kubernetes API emulator on a free port, shared by a module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.argocd.kubeapi import KubeAPI, kube_api


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeAPI]:
    with kube_api(tmp_path_factory.mktemp("kube")) as api:
        yield api
