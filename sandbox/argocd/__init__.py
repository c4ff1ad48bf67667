"""An emulator of Argo CD's application controller (and, below it, of the Kubernetes Deployment
controller and a Service) for the sandbox: `python -m sandbox.argocd --kubeconfig PATH ...`.

It reads `argoproj.io/v1alpha1` Application objects through the Kubernetes API, resolves their Git
source, runs the chart's image as a real container, and writes Application and Deployment status in
the shapes Argo CD and Kubernetes use, so that code tested against it works against the real thing.
"""

from sandbox.argocd.controller import Controller, stable_port
from sandbox.argocd.model import (
    ComparisonError,
    Desired,
    app_health,
    deep_merge,
    deployment_health,
    deployment_status,
    desired_from_manifests,
)

__all__ = [
    "ComparisonError",
    "Controller",
    "Desired",
    "app_health",
    "deep_merge",
    "deployment_health",
    "deployment_status",
    "desired_from_manifests",
    "stable_port",
]
