"""GitHub webhook receiver, in three layers: `core` (pure: signature, parsing, routing), `starter`
(creates the Prefect runs) and `http` (the FastAPI adapter and `serve`)."""

from deployments.webhook.core import (
    MAX_BODY_BYTES,
    Commit,
    Decision,
    DeployRequest,
    Event,
    Push,
    Repository,
    StartedRun,
    Starter,
    decide,
    is_pipeline_commit,
    parse_event,
    signature_for,
    validate_ref,
    validate_sha,
    verify_signature,
)
from deployments.webhook.http import create_app, load_webhook_secret, serve
from deployments.webhook.starter import PrefectStarter

__all__ = [
    "MAX_BODY_BYTES",
    "Commit",
    "Decision",
    "DeployRequest",
    "Event",
    "PrefectStarter",
    "Push",
    "Repository",
    "StartedRun",
    "Starter",
    "create_app",
    "decide",
    "is_pipeline_commit",
    "load_webhook_secret",
    "parse_event",
    "serve",
    "signature_for",
    "validate_ref",
    "validate_sha",
    "verify_signature",
]
