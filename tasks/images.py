"""Docker images: the tag scheme, build, push, and asking the registry what it serves.

Plain functions do the work (`image_tags`, `build_image`, `push_image`, `image_exists`,
`manifest_digest`); the `*_task` functions at the bottom are thin Prefect tasks over them.

The Docker SDK reports build and push failures inside the JSON stream rather than as exceptions,
so every stream is read to the end and its `error`/`errorDetail` entries are turned into
`BuildError` / `PushError`. A push is only reported done once the registry itself serves the
pushed digest for the primary tag (Registry HTTP API v2, manifest HEAD).
"""

from __future__ import annotations

import base64
import hashlib
import random
import re
import time
import unicodedata
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import httpx
import requests
import urllib3
from docker.errors import APIError, DockerException
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import SecretStr
from tenacity import RetryCallState, RetryError, Retrying, retry_if_exception

from delivery.errors import BuildError, ConfigError, DeliveryError, PushError, RegistryError
from delivery.log import get_logger
from delivery.redact import redact, register_secret
from delivery.settings import get_settings

# ---------------------------------------------------------------------------------------------
# Tag scheme
# ---------------------------------------------------------------------------------------------

_TAG_MAX = 128
_SHA7 = 7
# Room for "-<sha7>" so that the primary tag of any branch still fits in 128 characters.
_BRANCH_MAX = _TAG_MAX - _SHA7 - 1
_VALID_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_SHA = re.compile(r"^[0-9a-fA-F]{7,40}$")
# Release tags: v1.2.3, 1.2.3, v1.2.3-rc.1, v1.2.3+build.5
_SEMVER = re.compile(r"^v?\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")
_INVALID_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
_SEPARATOR_RUN = re.compile(r"[-.]*-[-.]*|\.{2,}")
# Long branch names are truncated, but input this large is no ref name at all.
_REF_MAX_BYTES = 4096


def sanitize_tag(name: str) -> str:
    """Turn a Git ref name into a valid Docker tag part, or raise `ConfigError` if nothing is left.

    `feature/x` -> `feature-x`; any character Docker does not allow becomes `-`; runs of separators
    collapse to one; leading and trailing `.`/`-` go (a tag may not start with them, and a leading
    dash would read as an option to any CLI the tag is later handed to).
    """
    # Accented letters keep their base letter (`fëature` -> `feature`) rather than becoming a dash.
    decomposed = unicodedata.normalize("NFKD", name)
    ascii_ish = "".join(c for c in decomposed if not unicodedata.combining(c))
    out = _INVALID_CHARS.sub("-", ascii_ish)
    out = _SEPARATOR_RUN.sub(lambda m: "." if set(m.group()) == {"."} else "-", out)
    out = out.strip(".-")
    if not out:
        raise ConfigError(f"ref name {name!r} has no characters usable in a Docker tag (empty after sanitising)")
    return out


def _truncate(tag: str, limit: int) -> str:
    return tag[:limit].rstrip(".-") or tag[:limit]


def _split_ref(ref: str) -> tuple[str, str]:
    """('branch' | 'tag', name) for `refs/heads/x`, `refs/tags/x` or a bare name."""
    if ref.startswith("refs/heads/"):
        return "branch", ref[len("refs/heads/"):]
    if ref.startswith("refs/tags/"):
        return "tag", ref[len("refs/tags/"):]
    # A bare release-looking name is what `git describe` and CI variables hand over for tag pushes.
    if _SEMVER.match(ref):
        return "tag", ref
    return "branch", ref


def image_tags(branch_or_tag: str, sha: str, default_branch: str = "main") -> list[str]:
    """The image tags for a push of `sha` to a branch or Git tag; element 0 is the primary tag.

    Branch: `<branch>-<sha7>` (immutable, the one the GitOps repo pins), `<branch>`, and `latest`
    only for the default branch. Release tag `vX.Y.Z`: the tag itself only (already immutable).
    Any other Git tag is handled like a branch without `latest`.
    """
    if not isinstance(branch_or_tag, str) or not branch_or_tag.strip():
        raise ConfigError("branch or tag name is empty")
    if len(branch_or_tag.encode("utf-8", "surrogatepass")) > _REF_MAX_BYTES:
        raise ConfigError(f"ref name is longer than {_REF_MAX_BYTES} bytes; not a Git ref")
    if not isinstance(sha, str) or not _SHA.match(sha):
        raise ConfigError(f"commit sha must be 7 to 40 hexadecimal characters, got {sha!r}")
    sha7 = sha.lower()[:_SHA7]
    kind, name = _split_ref(branch_or_tag.strip())
    if not name:
        raise ConfigError(f"ref {branch_or_tag!r} names no branch or tag")

    if kind == "tag" and _SEMVER.match(name):
        return [_truncate(sanitize_tag(name), _TAG_MAX)]

    base = _truncate(sanitize_tag(name), _BRANCH_MAX)
    tags = [f"{base}-{sha7}"]
    default = _split_ref(default_branch)[1] if default_branch else ""
    is_default = kind == "branch" and name == default
    # A branch literally called "latest" must not move the default branch's `latest`.
    if base != "latest" or is_default:
        tags.append(base)
    if is_default and "latest" not in tags:
        tags.append("latest")
    for t in tags:
        if not _VALID_TAG.match(t):  # pragma: no cover - sanitize_tag guarantees it
            raise ConfigError(f"computed tag {t!r} is not a valid Docker tag")
    return tags


# ---------------------------------------------------------------------------------------------
# Repository names and registry addresses
# ---------------------------------------------------------------------------------------------

_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*|\[[0-9a-fA-F:]+\])"
_REPOSITORY = re.compile(rf"^(?:{_HOST}(?::\d+)?/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*$")
_DOCKER_HUB = "registry-1.docker.io"


def _check_repository(repository: str) -> None:
    if not isinstance(repository, str) or len(repository) > 255 or not _REPOSITORY.match(repository):
        raise ConfigError(f"{repository!r} is not a valid image repository (expected e.g. 127.0.0.1:5000/workout-api)")


def _check_tags(tags: Iterable[str]) -> list[str]:
    tags = list(tags)
    if not tags:
        raise ConfigError("at least one image tag is required")
    for t in tags:
        if not isinstance(t, str) or not _VALID_TAG.match(t):
            raise ConfigError(f"{t!r} is not a valid Docker tag")
    return tags


def split_repository(repository: str) -> tuple[str, str]:
    """(registry host, repository path) the way Docker reads an image reference.

    The first path part is a registry host when it contains `.` or `:` or is `localhost`;
    otherwise the image lives on Docker Hub (where single names live under `library/`).
    """
    first, sep, rest = repository.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first, rest
    return _DOCKER_HUB, repository if sep else f"library/{repository}"


def _is_loopback(host: str) -> bool:
    hostname = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
    return hostname in ("localhost", "[::1]") or hostname.startswith("127.")


def _registry_base_url(host: str, insecure: bool | None) -> str:
    # Docker itself talks plain http to loopback registries; everything else is https unless told.
    use_http = _is_loopback(host) if insecure is None else insecure
    return f"{'http' if use_http else 'https'}://{host}"


# ---------------------------------------------------------------------------------------------
# Credentials
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegistryCredentials:
    username: str
    password: SecretStr

    def __post_init__(self) -> None:
        # Registering here means every later log line or error that happens to echo it is masked.
        register_secret(self.password.get_secret_value())

    def auth_config(self, registry_host: str) -> dict[str, str]:
        return {"username": self.username, "password": self.password.get_secret_value(),
                "serveraddress": registry_host}


def registry_credentials(settings: Any) -> RegistryCredentials | None:
    """Registry credentials from settings: the password setting, else the Prefect `Secret` block
    named by `registry_password_block`, else none (anonymous, like the sandbox registry)."""
    username = getattr(settings, "registry_username", None)
    password: SecretStr | None = getattr(settings, "registry_password", None)
    block = getattr(settings, "registry_password_block", None)
    if password is not None and password.get_secret_value():
        if not username:
            raise ConfigError("DELIVERY_REGISTRY_PASSWORD is set but DELIVERY_REGISTRY_USERNAME is not")
        return RegistryCredentials(username, password)
    if block:
        if not username:
            raise ConfigError("DELIVERY_REGISTRY_PASSWORD_BLOCK is set but DELIVERY_REGISTRY_USERNAME is not")
        from prefect.blocks.system import Secret

        try:
            value = Secret.load(block).get()
        except Exception as e:
            raise ConfigError(f"could not load the Prefect Secret block {block!r}: {type(e).__name__}") from e
        if not isinstance(value, str) or not value:
            raise ConfigError(f"the Prefect Secret block {block!r} does not hold a non-empty string")
        return RegistryCredentials(username, SecretStr(value))
    return None


def _secrets_of(credentials: RegistryCredentials | None) -> tuple[str, ...]:
    return (credentials.password.get_secret_value(),) if credentials else ()


# ---------------------------------------------------------------------------------------------
# Registry HTTP API v2
# ---------------------------------------------------------------------------------------------

_MANIFEST_ACCEPT = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
])
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


def _basic_header(credentials: RegistryCredentials) -> str:
    raw = f"{credentials.username}:{credentials.password.get_secret_value()}".encode()
    return "Basic " + base64.b64encode(raw).decode()


def _authorize(client: httpx.Client, response: httpx.Response, credentials: RegistryCredentials | None,
               timeout: float) -> str | None:
    """An Authorization header answering the registry's 401 challenge (Basic, or Bearer token), if any."""
    challenge = response.headers.get("www-authenticate", "")
    scheme, _, params_text = challenge.partition(" ")
    if scheme.lower() == "basic":
        if credentials is None:
            return None
        return _basic_header(credentials)
    if scheme.lower() == "bearer":
        params = dict(_CHALLENGE_PARAM.findall(params_text))
        realm = params.pop("realm", "")
        if not realm:
            return None
        auth = (httpx.BasicAuth(credentials.username, credentials.password.get_secret_value())
                if credentials else None)
        token_resp = client.get(realm, params=params, auth=auth, timeout=timeout)
        if token_resp.status_code != 200:
            return None
        body = token_resp.json()
        token = body.get("token") or body.get("access_token")
        if token:
            register_secret(token)
            return f"Bearer {token}"
    return None


def _registry_request(method: str, repository: str, tag: str, *, credentials: RegistryCredentials | None,
                      timeout: float, insecure: bool | None) -> httpx.Response:
    _check_repository(repository)
    _check_tags([tag])
    host, name = split_repository(repository)
    url = f"{_registry_base_url(host, insecure)}/v2/{name}/manifests/{tag}"
    headers = {"Accept": _MANIFEST_ACCEPT}
    secrets = _secrets_of(credentials)
    try:
        with httpx.Client(timeout=timeout, follow_redirects=True) as client:
            resp = client.request(method, url, headers=headers)
            if resp.status_code == 401:
                header = _authorize(client, resp, credentials, timeout)
                if header:
                    resp = client.request(method, url, headers={**headers, "Authorization": header})
            return resp
    except httpx.TimeoutException as e:
        raise RegistryError(f"registry {host} timed out after {timeout:g} s asking for {repository}:{tag}",
                            transient=True) from e
    except httpx.TransportError as e:
        raise RegistryError(redact(f"registry {host} unreachable asking for {repository}:{tag}: {e}", secrets),
                            transient=True) from e


def _status_error(resp: httpx.Response, repository: str, tag: str) -> RegistryError:
    code = resp.status_code
    if code == 401:
        what = "unauthorized (401): missing or wrong registry credentials"
    elif code == 403:
        what = "denied (403): the credentials may not read this repository"
    else:
        what = f"HTTP {code}"
    transient = code >= 500 or code == 429
    return RegistryError(f"registry refused the manifest of {repository}:{tag}: {what}", transient=transient)


def manifest_digest(repository: str, tag: str, *, credentials: RegistryCredentials | None = None,
                    timeout: float | None = None, insecure: bool | None = None) -> str | None:
    """The digest the registry serves for `repository:tag`, or None if it has no such manifest; each
    request bounded by `timeout` (default: the `registry_timeout_seconds` setting)."""
    timeout = get_settings().registry_timeout_seconds if timeout is None else timeout
    resp = _registry_request("HEAD", repository, tag, credentials=credentials, timeout=timeout, insecure=insecure)
    if resp.status_code == 404:
        return None
    if resp.status_code != 200:
        raise _status_error(resp, repository, tag)
    digest = resp.headers.get("docker-content-digest")
    if digest:
        return digest
    # The header is optional in the spec; the digest is then the hash of the manifest bytes.
    resp = _registry_request("GET", repository, tag, credentials=credentials, timeout=timeout, insecure=insecure)
    if resp.status_code == 404:
        return None
    if resp.status_code != 200:
        raise _status_error(resp, repository, tag)
    return resp.headers.get("docker-content-digest") or "sha256:" + hashlib.sha256(resp.content).hexdigest()


def image_exists(repository: str, tag: str, *, credentials: RegistryCredentials | None = None,
                 timeout: float | None = None, insecure: bool | None = None) -> bool:
    """True if the registry serves a manifest for `repository:tag` (a manifest HEAD answers 200),
    within `timeout` (default: the `registry_timeout_seconds` setting)."""
    timeout = get_settings().registry_timeout_seconds if timeout is None else timeout
    resp = _registry_request("HEAD", repository, tag, credentials=credentials, timeout=timeout, insecure=insecure)
    if resp.status_code == 200:
        return True
    if resp.status_code == 404:
        return False
    raise _status_error(resp, repository, tag)


# ---------------------------------------------------------------------------------------------
# Docker engine
# ---------------------------------------------------------------------------------------------

# Broken connections to the engine surface from several layers of the SDK's stack.
_ENGINE_ERRORS: tuple[type[BaseException], ...] = (
    requests.exceptions.RequestException, urllib3.exceptions.HTTPError, ConnectionError, DockerException,
)


def _docker_client(timeout: float) -> docker.DockerClient:
    return docker.from_env(timeout=timeout)


def _engine_unreachable(e: BaseException) -> str:
    return f"the Docker engine was unreachable or went away ({type(e).__name__}: {e})"


@dataclass(frozen=True)
class BuiltImage:
    repository: str
    tags: list[str]
    image_id: str
    primary_tag: str
    duration_s: float

    @property
    def refs(self) -> list[str]:
        return [f"{self.repository}:{t}" for t in self.tags]

    @property
    def ref(self) -> str:
        return f"{self.repository}:{self.primary_tag}"


_STEP = re.compile(r"^Step \d+/\d+ : ")
_BUILT = re.compile(r"^Successfully built ([0-9a-f]{12,64})$")
_TAIL = 20


def _rfc3339_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _stream_lines(chunks: Iterable[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Whole output lines from the build stream; the engine may split or merge lines across chunks."""
    pending = ""
    for chunk in chunks:
        text = chunk.get("stream")
        if text is None:
            if pending:
                yield pending, {}
                pending = ""
            yield "", chunk
            continue
        pending += text
        *lines, pending = pending.split("\n")
        for line in lines:
            yield line.rstrip("\r"), {}
    if pending:
        yield pending, {}


def build_image(context_dir: Path, repository: str, tags: list[str], *, dockerfile: str = "Dockerfile",
                build_args: dict[str, str] | None = None, labels: dict[str, str] | None = None,
                revision: str = "", source: str = "", timeout: float = 1800) -> BuiltImage:
    """Build `context_dir` into `repository` with every tag in `tags` (element 0 is the primary).

    Build output goes to the run log line by line as it arrives. OCI labels record the revision,
    source, creation time and version; labels passed in win over them.
    """
    log = get_logger()
    _check_repository(repository)
    tags = _check_tags(tags)
    primary = tags[0]
    context_dir = Path(context_dir)
    if not context_dir.is_dir():
        raise BuildError(f"build context {context_dir} is not a directory")
    if not (context_dir / dockerfile).is_file():
        raise BuildError(f"no {dockerfile} in build context {context_dir}")

    all_labels = {"org.opencontainers.image.created": _rfc3339_now(), "org.opencontainers.image.version": primary}
    if revision:
        all_labels["org.opencontainers.image.revision"] = revision
    if source:
        all_labels["org.opencontainers.image.source"] = redact(source)
    all_labels.update(labels or {})

    started = time.monotonic()
    tail: deque[str] = deque(maxlen=_TAIL)
    step = ""
    image_id = ""

    def fail(message: str) -> BuildError:
        return BuildError(redact(message), step=step, output_tail=[redact(x) for x in tail])

    log.info(f"building {repository}:{primary} from {context_dir}")
    try:
        client = _docker_client(timeout)
    except DockerException as e:
        raise fail(_engine_unreachable(e)) from e
    try:
        try:
            stream = client.api.build(
                path=str(context_dir), dockerfile=dockerfile, tag=f"{repository}:{primary}",
                buildargs=dict(build_args or {}), labels=all_labels,
                decode=True, rm=True, forcerm=True, pull=False,
            )
            for line, chunk in _stream_lines(stream):
                if line:
                    tail.append(line)
                    log.info(line)
                    if _STEP.match(line):
                        step = line
                    elif m := _BUILT.match(line):
                        image_id = image_id or m.group(1)
                    continue
                if "error" in chunk or "errorDetail" in chunk:
                    detail = (chunk.get("errorDetail") or {}).get("message") or chunk.get("error") or "unknown error"
                    tail.append(str(detail))
                    log.error(f"build failed: {detail}")
                    raise fail(f"build of {repository}:{primary} failed at {step or 'the start'}: {detail}")
                aux = chunk.get("aux") or {}
                if isinstance(aux, dict) and aux.get("ID"):
                    image_id = aux["ID"]
                if status := chunk.get("status"):
                    tail.append(str(status))
                    log.info(str(status))
        except APIError as e:
            # A 4xx/5xx from the engine before the stream starts: a bad Dockerfile name, a bad context.
            raise fail(f"build of {repository}:{primary} was refused by the Docker engine: "
                       f"{e.explanation or e}") from e
        except BuildError:
            raise
        except _ENGINE_ERRORS as e:
            raise fail(f"build of {repository}:{primary} did not finish: {_engine_unreachable(e)}") from e
        if not image_id:
            raise fail(f"build of {repository}:{primary} ended without reporting an image id")
        try:
            for t in tags:
                client.api.tag(image_id, repository, t, force=True)
            image_id = client.api.inspect_image(image_id)["Id"]
        except APIError as e:
            raise fail(f"tagging {repository} failed: {e.explanation or e}") from e
        except _ENGINE_ERRORS as e:
            raise fail(f"tagging {repository} failed: {_engine_unreachable(e)}") from e
    finally:
        client.close()
    built = BuiltImage(repository=repository, tags=tags, image_id=image_id, primary_tag=primary,
                       duration_s=round(time.monotonic() - started, 3))
    log.info(f"built {built.ref} ({image_id[:19]}) in {built.duration_s:.1f} s; tags: {', '.join(tags)}")
    return built


# ---------------------------------------------------------------------------------------------
# Push
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushedImage:
    repository: str
    tags: list[str]
    digest: str
    primary_tag: str
    attempts: int
    duration_s: float

    @property
    def ref(self) -> str:
        return f"{self.repository}@{self.digest}"


_DIGEST_IN_STATUS = re.compile(r"digest: (sha256:[0-9a-f]{64})")
_PERMANENT = (
    # (needle, what the user is told); checked before the transient ones.
    ("unauthorized", "unauthorized: missing or wrong registry credentials"),
    ("authentication required", "unauthorized: missing or wrong registry credentials"),
    ("no basic auth credentials", "unauthorized: no registry credentials were given"),
    ("denied", "denied: the credentials may not push to this repository"),
    ("forbidden", "denied: the credentials may not push to this repository"),
    ("does not exist locally", "not found: the image is not in the local Docker engine"),
    ("no such image", "not found: the image is not in the local Docker engine"),
    ("not found", "not found: the registry does not know this repository"),
    ("name unknown", "not found: the registry does not know this repository"),
    ("manifest unknown", "not found: the registry does not know this manifest"),
)
_TRANSIENT = (
    "connection refused", "connection reset", "broken pipe", "eof", "timeout", "timed out",
    "i/o timeout", "tls handshake", "no such host", "temporary failure", "server misbehaving",
    "internal server error", "bad gateway", "service unavailable", "gateway timeout", "too many requests",
    "500", "502", "503", "504", "429",
)


def classify_push_error(message: str) -> tuple[bool, str]:
    """(transient, reason) for an error the engine reported while pushing."""
    low = message.lower()
    for needle, reason in _PERMANENT:
        if needle in low:
            return False, reason
    for needle in _TRANSIENT:
        if needle in low:
            return True, "registry unreachable or failing"
    return False, "push refused"


def _push_tag(client: docker.DockerClient, repository: str, tag: str, auth: dict[str, str] | None,
              secrets: tuple[str, ...]) -> str:
    """Push one tag; return the digest the engine reports. Errors in the stream become `PushError`."""
    log = get_logger()
    digest = ""
    try:
        stream = client.api.push(repository, tag=tag, stream=True, decode=True, auth_config=auth)
        for chunk in stream:
            if "error" in chunk or "errorDetail" in chunk:
                detail = str((chunk.get("errorDetail") or {}).get("message") or chunk.get("error") or "unknown error")
                transient, reason = classify_push_error(detail)
                raise PushError(redact(f"push of {repository}:{tag} failed: {reason} ({detail})", secrets),
                                transient=transient)
            aux = chunk.get("aux")
            if isinstance(aux, dict) and aux.get("Digest"):
                digest = str(aux["Digest"])
            status = chunk.get("status")
            if status:
                if m := _DIGEST_IN_STATUS.search(str(status)):
                    digest = digest or m.group(1)
                # Progress ticks ("Pushing [==>  ]") would flood the log; keep state changes only.
                if not chunk.get("progressDetail") and status != "Pushing":
                    prefix = f"{chunk['id']}: " if chunk.get("id") else ""
                    log.info(redact(f"{prefix}{status}", secrets))
    except APIError as e:
        text = str(e.explanation or e)
        transient, reason = classify_push_error(text)
        if e.status_code is not None and e.status_code >= 500 and reason == "push refused":
            transient, reason = True, "the Docker engine failed"
        raise PushError(redact(f"push of {repository}:{tag} failed: {reason} ({text})", secrets),
                        transient=transient) from e
    except _ENGINE_ERRORS as e:
        raise PushError(redact(f"push of {repository}:{tag} failed: {_engine_unreachable(e)}", secrets),
                        transient=True) from e
    if not digest:
        raise PushError(f"push of {repository}:{tag} ended without the engine reporting a digest", transient=True)
    return digest


def _verify_digest(repository: str, tag: str, digest: str, credentials: RegistryCredentials | None,
                   timeout: float) -> None:
    try:
        served = manifest_digest(repository, tag, credentials=credentials, timeout=timeout)
    except RegistryError as e:
        raise PushError(f"pushed {repository}:{tag} but could not verify it: {e.message}",
                        transient=e.transient) from e
    if served is None:
        raise PushError(f"pushed {repository}:{tag} but the registry does not serve it (manifest not found)",
                        transient=True)
    if served != digest:
        # Someone else pushed the same tag in between: retrying would just race again.
        raise PushError(f"registry serves {served} for {repository}:{tag}, not the pushed {digest}",
                        transient=False)


def _wait_within(deadline: float, initial: float = 0.5, cap: float = 8.0):
    """Exponential backoff with full jitter, never sleeping past the deadline."""

    def wait(state: RetryCallState) -> float:
        exp = min(cap, initial * 2 ** (state.attempt_number - 1))
        return max(0.0, min(random.uniform(exp / 2, exp), deadline - time.monotonic()))

    return wait


def push_image(repository: str, tags: list[str], *, credentials: RegistryCredentials | None = None,
               max_attempts: int | None = None, max_seconds: float | None = None) -> PushedImage:
    """Push every tag of a built image, then check the registry serves the pushed digest.

    Transient failures (engine or registry unreachable, timeouts, 5xx) are retried with
    exponential backoff and jitter, bounded by `max_attempts` and `max_seconds` together (default:
    the `push_retry_attempts` / `push_retry_seconds` settings); unauthorized / denied / not found
    fail at once. This is the push's only retry layer.
    """
    log = get_logger()
    settings = get_settings()
    max_attempts = settings.push_retry_attempts if max_attempts is None else max_attempts
    max_seconds = settings.push_retry_seconds if max_seconds is None else max_seconds
    _check_repository(repository)
    tags = _check_tags(tags)
    if max_attempts < 1 or max_seconds <= 0:
        raise ConfigError("push needs max_attempts >= 1 and max_seconds > 0")
    primary = tags[0]
    host, _ = split_repository(repository)
    auth = credentials.auth_config(host) if credentials else None
    secrets = _secrets_of(credentials)
    started = time.monotonic()
    deadline = started + max_seconds
    attempts = 0

    def attempt() -> str:
        nonlocal attempts
        attempts += 1
        remaining = max(1.0, deadline - time.monotonic())
        try:
            client = _docker_client(timeout=max(remaining, 30))
        except DockerException as e:
            raise PushError(redact(f"push of {repository} failed: {_engine_unreachable(e)}", secrets),
                            transient=True) from e
        try:
            digests = {t: _push_tag(client, repository, t, auth, secrets) for t in tags}
        finally:
            client.close()
        digest = digests[primary]
        _verify_digest(repository, primary, digest, credentials, timeout=min(10.0, remaining))
        return digest

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(f"push attempt {state.attempt_number}/{max_attempts} failed, retrying: {exc}")

    retrying = Retrying(
        stop=lambda s: s.attempt_number >= max_attempts or time.monotonic() >= deadline,
        wait=_wait_within(deadline),
        retry=retry_if_exception(lambda e: isinstance(e, DeliveryError) and e.transient),
        before_sleep=before_sleep,
        reraise=False,
    )
    try:
        digest = retrying(attempt)
    except RetryError as e:
        last = e.last_attempt.exception()
        elapsed = time.monotonic() - started
        err = PushError(redact(f"push of {repository}:{primary} gave up after {attempts} attempt(s) in "
                               f"{elapsed:.1f} s (retried transient errors; bound: {max_attempts} attempts, "
                               f"{max_seconds:g} s); last error: {last}", secrets), transient=True)
        err.attempts = attempts  # type: ignore[attr-defined]
        raise err from last
    except PushError as e:
        e.attempts = attempts  # type: ignore[attr-defined]
        raise
    pushed = PushedImage(repository=repository, tags=tags, digest=digest, primary_tag=primary,
                         attempts=attempts, duration_s=round(time.monotonic() - started, 3))
    log.info(f"pushed {pushed.ref} as {', '.join(tags)} in {pushed.duration_s:.1f} s ({attempts} attempt(s))")
    return pushed


# ---------------------------------------------------------------------------------------------
# Prefect tasks
# ---------------------------------------------------------------------------------------------




@task(name="build-image", cache_policy=NO_CACHE)
def build_image_task(context_dir: Path, repository: str, tags: list[str], dockerfile: str = "Dockerfile",
                     build_args: dict[str, str] | None = None, labels: dict[str, str] | None = None,
                     revision: str = "", source: str = "") -> BuiltImage:
    """A failed build is deterministic for a given commit: no retries."""
    return build_image(context_dir, repository, tags, dockerfile=dockerfile, build_args=build_args,
                       labels=labels, revision=revision, source=source)


@task(name="push-image", cache_policy=NO_CACHE)
def push_image_task(repository: str, tags: list[str], credentials: RegistryCredentials | None = None,
                    max_attempts: int | None = None, max_seconds: float | None = None) -> PushedImage:
    """No task retries: `push_image` is the one retry layer, bounded by the `push_retry_*` settings."""
    return push_image(repository, tags, credentials=credentials, max_attempts=max_attempts, max_seconds=max_seconds)


__all__ = [
    "BuiltImage", "PushedImage", "RegistryCredentials", "build_image", "build_image_task", "classify_push_error",
    "image_exists", "image_tags", "manifest_digest", "push_image", "push_image_task",
    "registry_credentials", "sanitize_tag", "split_repository",
]
