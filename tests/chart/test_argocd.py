"""The Argo CD manifests render one Application per environment, pointed at the right place."""

from __future__ import annotations

import pytest
import yaml

from tests.chart.conftest import ARGOCD, CHART, ENVIRONMENTS, kustomize

NAMESPACES = {"dev": "woodez-database-dev", "staging": "woodez-database-staging", "prod": "woodez-database"}


def _check_common(app: dict) -> None:
    spec = app["spec"]
    assert app["apiVersion"] == "argoproj.io/v1alpha1"
    assert app["metadata"]["namespace"] == "argocd"
    assert app["metadata"]["finalizers"] == ["resources-finalizer.argocd.argoproj.io"]
    assert spec["project"] == "default"
    assert spec["source"]["repoURL"] == "https://github.com/your-org/workout-api.git"
    assert spec["source"]["path"] == "helm/workout-api"
    assert spec["source"]["helm"]["releaseName"] == "workout-api"
    # Inline values were where the old setup leaked a password: none at all now.
    assert set(spec["source"]["helm"]) == {"releaseName", "valueFiles"}
    assert spec["destination"]["server"] == "https://kubernetes.default.svc"
    assert spec["syncPolicy"]["automated"] == {"prune": True, "selfHeal": True, "allowEmpty": False}
    assert set(spec["syncPolicy"]["syncOptions"]) == {
        "CreateNamespace=true", "ServerSideApply=true", "RespectIgnoreDifferences=true"}
    assert spec["syncPolicy"]["retry"] == {
        "limit": 5, "backoff": {"duration": "5s", "factor": 2, "maxDuration": "3m"}}
    assert spec["ignoreDifferences"] == [{"group": "apps", "kind": "Deployment", "jsonPointers": ["/spec/replicas"]}]


def test_base_application(kubectl):
    """`kubectl kustomize argocd/` renders the base Application deploying values.yaml to woodez-database."""
    (app,) = kustomize(kubectl, ARGOCD)
    _check_common(app)
    assert app["metadata"]["name"] == "workout-api"
    assert app["metadata"]["labels"]["app.kubernetes.io/part-of"] == "workout-api"
    assert app["spec"]["source"]["targetRevision"] == "main"
    assert app["spec"]["source"]["helm"]["valueFiles"] == ["values.yaml"]
    assert app["spec"]["destination"]["namespace"] == "woodez-database"


def test_application_yaml_is_the_base_application():
    """argocd/application.yaml, read as a plain file, is the same Application the base renders."""
    app = yaml.safe_load((ARGOCD / "application.yaml").read_text())
    assert app["kind"] == "Application" and app["metadata"]["name"] == "workout-api"
    _check_common(app)


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_overlay_renders_one_application_for_the_environment(kubectl, env):
    """Each overlay renders exactly one Application `workout-api-<env>` on main with its namespace and values."""
    objects = kustomize(kubectl, ARGOCD / "overlays" / env)
    assert len(objects) == 1
    (app,) = objects
    assert app["kind"] == "Application"
    _check_common(app)
    assert app["metadata"]["name"] == f"workout-api-{env}"
    assert app["spec"]["source"]["targetRevision"] == "main"
    assert app["spec"]["destination"]["namespace"] == NAMESPACES[env]
    value_files = app["spec"]["source"]["helm"]["valueFiles"]
    assert value_files == ["values.yaml", f"values-{env}.yaml"]
    for name in value_files:
        assert (CHART / name).is_file(), f"{name} named by the {env} Application is missing from the chart"
