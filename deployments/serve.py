"""The local default way to run the flows: one process serving the three deployments with
`prefect.serve` (no work pool), the drift check on its schedule.

`prefect.yaml` declares the same three deployments for a `process` work pool; a test compares it
with `deployment_specs()` (names, entrypoints, descriptions, tags, schedules, limits) so the two
cannot drift apart."""

from __future__ import annotations

import os
from typing import Any

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.schedules import Cron

from flows.deploy import deploy
from flows.drift import drift_check
from flows.rollback import rollback

DRIFT_CRON = os.environ.get("DELIVERY_DRIFT_CRON", "*/15 * * * *")
# A backstop only: the real guard is the per-app-and-environment lock inside the flow.
DEPLOY_CONCURRENCY = 25


def deployment_specs() -> list[Any]:
    return [
        deploy.to_deployment(
            name="deploy",
            description="Build, push, bump values, wait for Argo CD at our commit, verify; roll back on failure.",
            concurrency_limit=ConcurrencyLimitConfig(limit=DEPLOY_CONCURRENCY,
                                                     collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
            tags=["delivery"],
        ),
        rollback.to_deployment(
            name="rollback",
            description="Put the last known-good (or a given) image tag back as a new commit and verify it.",
            tags=["delivery"],
        ),
        drift_check.to_deployment(
            name="drift-check",
            description="Git vs cluster vs Argo CD, missing images and plaintext secrets in Git.",
            schedule=Cron(DRIFT_CRON, timezone="UTC"),
            tags=["delivery"],
        ),
    ]


def main() -> None:
    serve(*deployment_specs(), limit=int(os.environ.get("DELIVERY_SERVE_LIMIT", "25")))


if __name__ == "__main__":
    main()
