"""Kubernetes access shared by the Argo CD and probe tasks: one API client per kubeconfig, and a
bounded watch of one named object.

The watch is what lets a wait react within milliseconds of a status change instead of polling:
list (to get the object and a resourceVersion), then watch from that version; on a dropped stream
resume from the last version seen; on `410 Gone` list again. It also hands back the current state
every `tick` seconds without events, because some verdicts depend on elapsed time.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from delivery.errors import ConfigError
from delivery.log import get_logger
from delivery.settings import get_settings

_clients: dict[tuple[str, int], client.ApiClient] = {}
_clients_lock = threading.Lock()

# urllib3 errors that mean "the connection broke or timed out", not "the API said no".
STREAM_ERRORS: tuple[type[BaseException], ...] = (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)


def request_timeout() -> tuple[float, float]:
    """(connect, read) seconds for one API request, from `kube_timeout_seconds`."""
    t = get_settings().kube_timeout_seconds
    return (min(5.0, t), t)


def resolve_kubeconfig(kubeconfig: Path | str | None = None) -> Path | None:
    """The kubeconfig to use: the explicit one, else the settings' (which fall back to the sandbox's)."""
    if kubeconfig:
        return Path(kubeconfig)
    return get_settings().resolved_kubeconfig()


def api_client(kubeconfig: Path | str | None = None) -> client.ApiClient:
    """An API client for the kubeconfig (or in-cluster config when there is none), cached.

    The cache key includes the file's mtime so that a rewritten kubeconfig (a restarted sandbox on a
    new port) is picked up without restarting the process.
    """
    path = resolve_kubeconfig(kubeconfig)
    if path is None:
        key = ("<in-cluster>", 0)
    else:
        try:
            key = (str(path.resolve()), path.stat().st_mtime_ns)
        except OSError as e:
            raise ConfigError(f"kubeconfig {path} cannot be read: {e.strerror or e}") from e
    with _clients_lock:
        cached = _clients.get(key)
        if cached is not None:
            return cached
        try:
            if path is None:
                cfg = client.Configuration()
                config.load_incluster_config(client_configuration=cfg)
                new = client.ApiClient(configuration=cfg)
            else:
                new = config.new_client_from_config(config_file=str(path))
        except ConfigException as e:
            where = f"kubeconfig {path}" if path else "in-cluster config (no kubeconfig set)"
            raise ConfigError(f"cannot load {where}: {e}") from e
        _clients[key] = new
        return new


def api_error_text(e: BaseException) -> str:
    """A short, readable text for an API or connection error (the API's own message when it sent one)."""
    if isinstance(e, ApiException):
        message = ""
        if e.body:
            try:
                body = json.loads(e.body)
                message = body.get("message", "") if isinstance(body, dict) else ""
            except (ValueError, TypeError):
                message = str(e.body)[:200]
        return f"HTTP {e.status} {e.reason or ''}".strip() + (f": {message}" if message else "")
    return f"{type(e).__name__}: {e}"[:300]


def is_transient(e: BaseException) -> bool:
    """Connection trouble, timeouts, 429 and 5xx may pass; anything else the API said will not."""
    if isinstance(e, ApiException):
        return e.status in (0, 429) or (e.status or 0) >= 500
    return isinstance(e, STREAM_ERRORS)


def _items_named(body: dict[str, Any], name: str) -> dict[str, Any] | None:
    for item in body.get("items") or []:
        if (item.get("metadata") or {}).get("name") == name:
            return item
    return None


def _rv(obj: dict[str, Any] | None) -> str | None:
    return ((obj or {}).get("metadata") or {}).get("resourceVersion") or None


def watch_object(
    list_fn: Callable[..., Any],
    name: str,
    *,
    deadline: float,
    tick: float = 1.5,
    **list_kwargs: Any,
) -> Iterator[dict[str, Any] | None]:
    """Yield the state of object `name` (a dict, or None while it does not exist) until `deadline`.

    `list_fn` is a generated list call (`CustomObjectsApi.list_namespaced_custom_object`,
    `AppsV1Api.list_namespaced_deployment`, ...) and `list_kwargs` its arguments (namespace, group,
    ...). `deadline` is a `time.monotonic()` value. The first state is yielded at once, then one per
    change of the object, and the current one again every `tick` seconds without changes. API errors
    on the initial list propagate; errors on the stream are retried until the deadline.
    """
    log = get_logger()
    selector = f"metadata.name={name}"

    def list_now() -> tuple[dict[str, Any] | None, str | None]:
        remaining = max(1.0, deadline - time.monotonic())
        resp = list_fn(**list_kwargs, field_selector=selector, _preload_content=False,
                       _request_timeout=(request_timeout()[0], min(request_timeout()[1], remaining + 5)))
        try:
            body = json.loads(resp.data or b"{}")
        finally:
            resp.release_conn()
        obj = _items_named(body, name)
        # Resume from the LIST's resourceVersion, not the object's: it is the point in time the list
        # describes, and watching from an older object version can replay, or 410, needlessly.
        return obj, ((body.get("metadata") or {}).get("resourceVersion") or _rv(obj))

    current, rv = list_now()
    yield current
    last_yield = time.monotonic()
    last_error = ""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        window = min(tick, remaining)
        w = watch.Watch()
        kwargs: dict[str, Any] = dict(list_kwargs, field_selector=selector, allow_watch_bookmarks=True,
                                      timeout_seconds=max(1, round(window)),
                                      # The client-side read timeout bounds the wait on servers that
                                      # ignore timeoutSeconds, and after a silently dead connection.
                                      _request_timeout=(request_timeout()[0], window + 1.0))
        if rv:
            kwargs["resource_version"] = rv
        stream_started = time.monotonic()
        stream = w.stream(list_fn, **kwargs)
        try:
            for event in stream:
                kind = event.get("type")
                obj = event.get("raw_object") or event.get("object") or {}
                if kind == "BOOKMARK":
                    rv = _rv(obj) or rv
                    continue
                if (obj.get("metadata") or {}).get("name") == name:
                    rv = _rv(obj) or rv
                    current = None if kind == "DELETED" else obj
                    last_yield = time.monotonic()
                    yield current
                elif time.monotonic() - last_yield >= tick:
                    last_yield = time.monotonic()
                    yield current
                if time.monotonic() >= deadline or time.monotonic() - stream_started > window + 1.0:
                    break
            last_error = ""
        except ApiException as e:
            if e.status == 410:
                log.debug(f"watch of {name}: resourceVersion {rv} expired (410 Gone); listing again")
                try:
                    current, rv = list_now()
                except (ApiException, *STREAM_ERRORS) as e2:
                    _note(log, name, e2, last_error)
                    last_error = api_error_text(e2)
                    time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            elif is_transient(e):
                text = api_error_text(e)
                if text != last_error:
                    log.warning(f"watch of {name} failed ({text}); retrying")
                last_error = text
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            else:
                raise
        except STREAM_ERRORS as e:
            # A dropped or timed-out stream: resume from the last resourceVersion we saw.
            text = api_error_text(e)
            if time.monotonic() - stream_started < 0.5:
                # Failing at once (API down): don't spin, and say so once.
                if text != last_error:
                    log.warning(f"watch of {name} cannot connect ({text}); retrying")
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            last_error = text
        finally:
            w.stop()
            stream.close()
        if time.monotonic() - stream_started < 0.2:
            # A server that ends streams at once must not turn this loop into a busy one.
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        if time.monotonic() - last_yield >= min(tick, 0.5) or time.monotonic() >= deadline:
            last_yield = time.monotonic()
            yield current


def _note(log: Any, name: str, e: BaseException, last_error: str) -> None:
    text = api_error_text(e)
    if text != last_error:
        log.warning(f"listing {name} again failed ({text}); retrying")
