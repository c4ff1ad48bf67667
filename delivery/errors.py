"""One exception tree for the whole pipeline.

Every error a task can raise is a `DeliveryError`. `transient` tells the retry layer whether trying
again can help (connection refused, timeouts, 5xx, non-fast-forward) or not (401, a broken
Dockerfile, a conflict on the same line). Messages never carry secrets: callers pass redacted text.
"""

from __future__ import annotations


class DeliveryError(Exception):
    """Base of every error the pipeline raises on purpose."""

    transient: bool = False

    def __init__(self, message: str, *, transient: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if transient is not None:
            self.transient = transient


class ConfigError(DeliveryError):
    """The delivery config or settings are missing, malformed or inconsistent."""


class BuildError(DeliveryError):
    """`docker build` failed; carries the failing step and the last lines of output."""

    def __init__(self, message: str, *, step: str = "", output_tail: list[str] | None = None) -> None:
        super().__init__(message, transient=False)
        self.step = step
        self.output_tail = list(output_tail or [])


class PushError(DeliveryError):
    """Pushing an image to the registry failed (transient or not)."""


class RegistryError(DeliveryError):
    """The registry could not be asked about an image (manifest HEAD failed)."""


class ValuesError(DeliveryError):
    """A Helm values file is missing, not YAML, or lacks the key we must rewrite."""


class GitError(DeliveryError):
    """A Git operation on the GitOps or source repository failed."""


class GitPushError(GitError):
    """`git push` was refused for good: a conflict, a hook that declines, bad credentials."""


class ArgoCDError(DeliveryError):
    """The Argo CD Application could not be read or patched."""


class SyncTimeout(ArgoCDError):
    """Argo CD did not report synced-and-healthy at our revision in time."""


class SyncFailed(ArgoCDError):
    """Argo CD reported a failed sync, a comparison error, or a degraded application."""


class RolloutFailed(DeliveryError):
    """The Deployment rollout failed or did not finish in time."""


class HealthCheckFailed(DeliveryError):
    """The app's health endpoint did not answer the expected version in time."""


class DeploySuperseded(DeliveryError):
    """A newer commit of the same branch was deployed or queued; this one must not win."""


class LockTimeout(DeliveryError):
    """The environment's deploy lock was not free within the run's lock timeout."""


class LockError(DeliveryError):
    """The environment's deploy lock cannot be taken at all: its concurrency limit is missing or
    inactive, or the Prefect server refuses the request."""


class RollbackError(DeliveryError):
    """The rollback could not be carried out or verified."""


class PromotionRefused(DeliveryError):
    """A promotion was refused before anything was written: the tag was not verified in the source
    environment, its image's digest changed since, it has not soaked long enough, or the config does
    not promote that way."""


class RecoveryError(DeliveryError):
    """A crashed run cannot be recovered: it is not a deploy run, it is still running, or its
    parameters are unusable."""


class WebhookError(DeliveryError):
    """A webhook delivery was refused; `status` is the HTTP status to answer."""

    def __init__(self, message: str, *, status: int, transient: bool = False) -> None:
        super().__init__(message, transient=transient)
        self.status = status


class GitHubError(DeliveryError):
    """A GitHub REST API call failed; `status` is the HTTP status (None: no answer). Only the GitHub
    feedback module raises it, and it turns it into a report note: GitHub never fails a deploy."""

    def __init__(self, message: str, *, status: int | None = None, transient: bool = False,
                 retry_after: float | None = None) -> None:
        super().__init__(message, transient=transient)
        self.status = status
        self.retry_after = retry_after


class SandboxError(DeliveryError):
    """A part of the local sandbox failed to start or answer."""
