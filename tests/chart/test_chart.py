"""The workout-api Helm chart lints, renders valid Kubernetes objects, and keeps secrets out of Git."""

from __future__ import annotations

import base64
import re

import kubernetes_validate
import pytest
import yaml

from tests.chart.conftest import CHART, ENVIRONMENTS, by_kind, render, run, values_args

# The newest schema set kubernetes-validate ships offline (it bundles every minor version up to it);
# kubectl from .tools is v1.37 too.
K8S_VERSION = "1.37"


def deployment(objects: list[dict]) -> dict:
    (dep,) = by_kind(objects, "Deployment")
    return dep


def container(objects: list[dict]) -> dict:
    (ctr,) = deployment(objects)["spec"]["template"]["spec"]["containers"]
    return ctr


@pytest.mark.parametrize("env", [None, *ENVIRONMENTS])
def test_helm_lint_passes(helm, env):
    """`helm lint` accepts the chart alone and with each environment's values file."""
    proc = run([helm, "lint", CHART, "--strict", *values_args(env)])
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("env", [None, *ENVIRONMENTS])
def test_rendered_objects_validate_against_kubernetes_schema(helm, env):
    """Every object rendered for an environment is valid for the Kubernetes API, unknown fields included."""
    objects = render(helm, env)
    assert {o["kind"] for o in objects} == {"ServiceAccount", "ConfigMap", "Service", "Deployment"}
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_optional_objects_validate_when_enabled(helm):
    """Ingress, HPA and a chart-made Secret are valid objects when switched on."""
    objects = render(helm, "prod", sets={
        "ingress.enabled": "true",
        "ingress.className": "nginx",
        "ingress.tls[0].secretName": "workout-api-tls",
        "ingress.tls[0].hosts[0]": "workout-api.example.com",
        "autoscaling.enabled": "true",
        "secrets.create": "true",
        "secrets.djangoSecretKey": "test-only-key",  # secret-scan: allow
        "secrets.postgresPassword": "test-only-pw",  # secret-scan: allow
    })
    kinds = {o["kind"] for o in objects}
    assert {"Ingress", "HorizontalPodAutoscaler", "Secret"} <= kinds
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("env", [None, *ENVIRONMENTS])
def test_no_secret_is_rendered_by_default(helm, env):
    """By default the chart renders no Secret: the real one is created out of band."""
    assert by_kind(render(helm, env), "Secret") == []


def test_secret_rendered_from_command_line_values(helm):
    """secrets.create=true renders the Secret the pods read, from values given on the command line."""
    objects = render(helm, sets={
        "secrets.create": "true",
        "secrets.djangoSecretKey": "cli-key",  # secret-scan: allow
        "secrets.postgresPassword": "cli-pw",  # secret-scan: allow
    })
    (secret,) = by_kind(objects, "Secret")
    assert secret["metadata"]["name"] == "workout-api-secrets"
    assert secret["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"] == "1"
    assert set(secret["data"]) == {"django-secret-key", "postgres-password", "mongodb-password"}
    assert base64.b64decode(secret["data"]["postgres-password"]).decode() == "cli-pw"


def test_secret_create_without_values_fails_loudly(helm):
    """secrets.create=true without the values is an error, not an empty Secret."""
    proc = run([helm, "template", "workout-api", CHART, "--set", "secrets.create=true"], check=False)
    assert proc.returncode != 0
    assert "secrets.djangoSecretKey" in proc.stderr


@pytest.mark.parametrize("env", [None, *ENVIRONMENTS])
def test_deployment_is_named_after_the_release(helm, env):
    """The Deployment, Service and pod selector are `workout-api`, as the pipeline and Argo CD expect."""
    objects = render(helm, env)
    dep = deployment(objects)
    assert dep["metadata"]["name"] == "workout-api"
    (svc,) = by_kind(objects, "Service")
    assert svc["metadata"]["name"] == "workout-api"
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("env", [None, *ENVIRONMENTS])
def test_deployment_probes_health_endpoint(helm, env):
    """Readiness and liveness probes GET /api/health/ on the container port (8000)."""
    ctr = container(render(helm, env))
    assert ctr["ports"][0]["containerPort"] == 8000
    for probe in ("readinessProbe", "livenessProbe"):
        assert ctr[probe]["httpGet"] == {"path": "/api/health/", "port": 8000}


def test_deployment_rollout_settings(helm):
    """Rolling update without unavailable pods, Kubernetes' progress deadline, sync waves 1 then 2."""
    objects = render(helm)
    dep = deployment(objects)
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate"
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert dep["spec"]["progressDeadlineSeconds"] == 600
    assert dep["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"] == "2"
    (cm,) = by_kind(objects, "ConfigMap")
    assert cm["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"] == "1"


def test_deployment_reads_config_and_secret_references(helm):
    """Env comes from the ConfigMap and secretKeyRefs to workout-api-secrets (mongodb optional)."""
    objects = render(helm)
    ctr = container(objects)
    (cm,) = by_kind(objects, "ConfigMap")
    assert ctr["envFrom"] == [{"configMapRef": {"name": cm["metadata"]["name"]}}]
    assert cm["data"]["POSTGRES_HOST"] == "postgres-svc"
    assert cm["data"]["MONGODB_PORT"] == "27017"
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in ctr["env"] if "valueFrom" in e}
    assert {r["name"] for r in refs.values()} == {"workout-api-secrets"}
    assert refs["DJANGO_SECRET_KEY"]["key"] == "django-secret-key"
    assert refs["POSTGRES_PASSWORD"]["key"] == "postgres-password"
    assert refs["MONGODB_PASSWORD"] == {"name": "workout-api-secrets", "key": "mongodb-password", "optional": True}
    assert not [e for e in ctr["env"] if "PASSWORD" in e["name"] and "value" in e]


def test_config_change_changes_pod_checksum(helm):
    """A ConfigMap change alters the pod template (checksum/config), so pods roll."""
    before = deployment(render(helm))["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    after = deployment(render(helm, sets={"config.postgres.host": "other-db"}))
    after_sum = after["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert re.fullmatch(r"[0-9a-f]{64}", before)
    assert before != after_sum
    image_only = deployment(render(helm, sets={"image.tag": "9.9.9"}))
    assert image_only["spec"]["template"]["metadata"]["annotations"]["checksum/config"] == before


def test_autoscaling_leaves_replicas_to_the_hpa(helm):
    """With autoscaling on, the Deployment has no replicas and an HPA targets it."""
    objects = render(helm, sets={"autoscaling.enabled": "true"})
    assert "replicas" not in deployment(objects)["spec"]
    (hpa,) = by_kind(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "workout-api"
    assert deployment(render(helm))["spec"]["replicas"] == 2


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_environment_tag_wins_over_default(helm, env):
    """The image is the repository from values.yaml with the tag pinned in values-<env>.yaml."""
    pinned = yaml.safe_load((CHART / f"values-{env}.yaml").read_text())["image"]["tag"]
    assert container(render(helm, env))["image"] == f"docker.io/your-org/workout-api:{pinned}"


def test_values_yaml_top_has_the_shape_tools_rely_on():
    """values.yaml starts with the image block other tools rewrite and read, in the agreed layout."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    assert lines[0] == "image:"
    body = [ln for ln in lines[1:] if not ln.lstrip().startswith("#")][:5]
    assert body == [
        "  repository: docker.io/your-org/workout-api",
        '  tag: "latest"',
        "  pullPolicy: IfNotPresent",
        "replicaCount: 2",
        "containerPort: 8000",
    ]
    assert lines[1].startswith("  #"), "a comment explains the image block"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["secrets"] == {"create": False, "existingSecret": "workout-api-secrets"}
    assert values["progressDeadlineSeconds"] == 600


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_environment_values_pin_a_quoted_tag_with_a_comment(env):
    """values-<env>.yaml holds `  tag: "..."` under `image:`, after a comment saying the pipeline rewrites it."""
    lines = (CHART / f"values-{env}.yaml").read_text().splitlines()
    start = lines.index("image:")
    tag_at = next(i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("tag:"))
    assert re.fullmatch(r'  tag: "[^"]+"', lines[tag_at])
    assert all(ln.startswith("  #") for ln in lines[start + 1 : tag_at]) and tag_at > start + 1
    assert "pipeline" in " ".join(lines[start + 1 : tag_at])
