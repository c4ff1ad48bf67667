"""Settings: one pydantic class, read from `DELIVERY_*` environment variables (and `.env`).

Secrets are `SecretStr` so that printing a `Settings` object, or a Prefect parameter built from it,
shows `**********` rather than the value. Code that needs the value calls `.get_secret_value()` at
the last moment and never logs it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

# The checkout this package runs from; the sandbox keeps its state beside it by default.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DELIVERY_", env_file=".env", extra="ignore")

    # Where apps and environments are described. Empty means: the sandbox's own config.
    config_file: Path | None = None
    sandbox_dir: Path = Field(default=PROJECT_ROOT / ".sandbox")

    # Registry the pipeline pushes to, and its credentials (none for the sandbox registry).
    registry: str = "127.0.0.1:5000"
    registry_username: str | None = None
    registry_password: SecretStr | None = None
    # Name of a Prefect `Secret` block holding the registry password, used when the setting is empty.
    registry_password_block: str | None = None

    # Token for https Git remotes (and http ones on loopback). It reaches git only as an
    # `http.<url>.extraHeader` in the child's environment: never in a URL, an argument or .git/config.
    git_token: SecretStr | None = None
    git_author_name: str = "delivery-bot"
    git_author_email: str = "delivery-bot@users.noreply.local"

    # GitHub webhook shared secret; the receiver refuses to start without one.
    webhook_secret: SecretStr | None = None
    webhook_secret_block: str | None = None
    # The receiver's durable intake (SQLite): where it lives (default under the work dir) and its
    # bounds. At `webhook_store_max_pending` deliveries not yet dispatched it answers 503 with
    # Retry-After; past `webhook_store_max_records` the oldest finished deliveries are dropped.
    webhook_store_path: Path | None = None
    webhook_store_max_pending: int = Field(default=10_000, ge=1)
    webhook_store_max_records: int = Field(default=100_000, ge=1)
    # Ceiling of the dispatcher's backoff while Prefect is unreachable (it retries for as long as needed).
    webhook_dispatch_backoff_max_seconds: float = Field(default=30, gt=0)

    # Messages on a failed deploy, rollback, recovery or promotion, and on a rejected or timed-out
    # approval (Prefect automations, made by deployments/automations.py when serve starts): a
    # Slack-compatible incoming webhook URL (a credential: kept in a Prefect block's secrets), or the
    # name of a Prefect notification block, `<block type slug>/<name>`.
    notify_webhook_url: SecretStr | None = None
    notify_block: str | None = None

    # GitHub deploy feedback (commit statuses and Deployments on the source repository). No token means
    # no feedback. The token, from the setting or else the named Prefect `Secret` block, travels only
    # in the `Authorization` header. GitHub Enterprise: `github_api_url` is `https://HOST/api/v3`.
    # `github_repository` ("owner/name") applies to apps whose config names none and whose
    # source_repo is not a URL on that GitHub.
    github_token: SecretStr | None = None
    github_token_block: str | None = None
    github_api_url: str = "https://api.github.com"
    github_repository: str | None = None
    # One request's timeout; an outage (connection error, timeout, 5xx, 429, rate limit) is retried up
    # to `github_attempts` times within `github_retry_seconds`, then given up: feedback never fails a deploy.
    github_timeout_seconds: float = Field(default=10, gt=0)
    github_attempts: int = Field(default=4, ge=1)
    github_retry_seconds: float = Field(default=30, gt=0)

    # Lease of the per-environment deploy lock, renewed every 10 s while the run lives
    # (delivery/runs.py): how long a killed run keeps the environment locked before Prefect's
    # repossessor frees it, and the longest Prefect server outage (less 10 s) a running deploy keeps
    # its lock through. 120 s: a server stopped 60 s and started again (measured, about 70 s without
    # an API) does not free the lock under a live deploy. The server refuses leases under 60 s.
    lock_lease_seconds: float = Field(default=120, ge=60)

    # How long a promotion that needs an approval waits for one (suspended, holding no lock and no
    # process) before it ends Cancelled. A promote run's `approval_timeout` parameter overrides it.
    approval_timeout_seconds: float = Field(default=86_400, gt=0)

    # Bounds of every external call. A git command (clone, fetch, push, a local one) is killed after
    # `git_timeout_seconds`; transient git failures are retried up to `git_retry_attempts` times
    # within `git_retry_seconds`. An image push: `push_retry_attempts` within `push_retry_seconds`.
    git_timeout_seconds: float = Field(default=60, gt=0)
    git_retry_attempts: int = Field(default=3, ge=1)
    git_retry_seconds: float = Field(default=120, gt=0)
    push_retry_attempts: int = Field(default=5, ge=1)
    push_retry_seconds: float = Field(default=300, gt=0)
    registry_timeout_seconds: float = Field(default=10, gt=0)
    # One Kubernetes API request (watches use their own window plus this for the connection).
    kube_timeout_seconds: float = Field(default=30, gt=0)
    # One HTTP request to the app or Argo CD's server; waits retry within their own timeout.
    http_timeout_seconds: float = Field(default=5, gt=0)

    # A new pod whose container runs but has not once passed readiness after this long fails the
    # rollout (and the deploy rolls back) instead of waiting out the Deployment's progress deadline
    # (600 s in the chart). It must cover the readiness probe's initial delay plus its failure
    # threshold × period (2 + 3 × 5 s in the chart) with room for a slow start.
    readiness_grace_seconds: float = Field(default=30, gt=0)

    # Kubernetes access: a kubeconfig path; empty means the sandbox's, or in-cluster config.
    kubeconfig: Path | None = None

    # Where flows keep their clones of the source and GitOps repositories between runs.
    work_dir_override: Path | None = Field(default=None, alias="DELIVERY_WORK_DIR")

    @property
    def work_dir(self) -> Path:
        return self.work_dir_override or (self.sandbox_dir / "work")

    @property
    def sandbox_kubeconfig(self) -> Path:
        return self.sandbox_dir / "kubeconfig"

    @property
    def sandbox_config_file(self) -> Path:
        return self.sandbox_dir / "delivery.yaml"

    def resolved_config_file(self) -> Path:
        """The config in force: the explicit one, else `./delivery.yaml`, else the sandbox's."""
        if self.config_file is not None:
            return self.config_file
        local = Path.cwd() / "delivery.yaml"
        if local.exists():
            return local
        return self.sandbox_config_file

    def resolved_webhook_store_path(self) -> Path:
        return self.webhook_store_path or (self.work_dir / "webhook" / "deliveries.sqlite3")

    def resolved_kubeconfig(self) -> Path | None:
        if self.kubeconfig is not None:
            return self.kubeconfig
        if self.sandbox_kubeconfig.exists():
            return self.sandbox_kubeconfig
        return None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
