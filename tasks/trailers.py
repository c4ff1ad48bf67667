"""Commit messages and their trailers: what marks a values commit as the pipeline's, and for which app,
environment, tag and source commit. Pure text, no git, so the webhook can tell our own pushes apart
without importing a git library.
"""

from __future__ import annotations

import re
from typing import Literal

PIPELINE_TRAILER = "Delivery-Pipeline"

_PIPELINE_KINDS = {"bump": "values-bump", "rollback": "rollback"}
_TRAILER_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9-]*)[ \t]*:[ \t]*(.*)$")


def _one_line(value: str) -> str:
    return " ".join(str(value).split())


def commit_message(
    kind: Literal["bump", "rollback"],
    tag: str,
    *,
    app: str,
    environment: str,
    source_sha: str | None = None,
    digest: str | None = None,
    replaces: str | None = None,
    reason: str = "",
    flow_run_id: str | None = None,
    flow_run_url: str | None = None,
    promoted_from: str | None = None,
    approved_by: str | None = None,
    approval_comment: str = "",
) -> str:
    """The message of a values commit: subject, a body a reviewer can read, and machine-readable trailers.

    A promotion (`promoted_from`: the environment whose verified image this is) is a bump like any
    other (`Delivery-Pipeline: values-bump`), with trailers naming its source environment and, when
    someone approved it, who and with what comment."""
    if kind not in _PIPELINE_KINDS:
        raise ValueError(f"unknown commit kind {kind!r}")
    tag, app, environment = _one_line(tag), _one_line(app), _one_line(environment)
    verb = "update" if kind == "bump" else "roll back"
    subject = f"chore(helm): {verb} image tag to {tag}"
    if kind == "bump" and promoted_from:
        body = [f"Promote {app} from {_one_line(promoted_from)} to {environment}: image tag {tag}, "
                "the image verified there, not rebuilt."]
    elif kind == "bump":
        body = [f"Deploy {app} to {environment} with image tag {tag}."]
    else:
        body = [f"Roll {app} in {environment} back to image tag {tag}."]
    if source_sha:
        body.append(f"Source commit: {_one_line(source_sha)}")
    if digest:
        body.append(f"Image digest: {_one_line(digest)}")
    if replaces:
        body.append(f"Replaces tag: {_one_line(replaces)}")
    if reason.strip():
        # Blank lines in the reason would end the body early and confuse trailer parsing.
        body.append("Reason: " + " ".join(ln.strip() for ln in reason.strip().splitlines() if ln.strip()))
    if approved_by:
        body.append(f"Approved by: {_one_line(approved_by)}")
    if approval_comment.strip():
        body.append(f"Approval comment: {_one_line(approval_comment)}")
    if flow_run_id:
        body.append(f"Prefect flow run: {_one_line(flow_run_id)}")
    if flow_run_url:
        body.append(f"Flow run URL: {_one_line(flow_run_url)}")
    trailers = [
        f"{PIPELINE_TRAILER}: {_PIPELINE_KINDS[kind]}",
        f"Delivery-App: {app}",
        f"Delivery-Environment: {environment}",
        f"Delivery-Tag: {tag}",
    ]
    if source_sha:
        trailers.append(f"Delivery-Source-Commit: {_one_line(source_sha)}")
    if digest:
        trailers.append(f"Delivery-Image-Digest: {_one_line(digest)}")
    if promoted_from:
        trailers.append(f"Delivery-Promoted-From: {_one_line(promoted_from)}")
    if approved_by:
        trailers.append(f"Delivery-Approved-By: {_one_line(approved_by)}")
    if approval_comment.strip():
        trailers.append(f"Delivery-Approval-Comment: {_one_line(approval_comment)}")
    if flow_run_id:
        trailers.append(f"Delivery-Flow-Run: {_one_line(flow_run_id)}")
    return "\n".join([subject, "", *body, "", *trailers]) + "\n"


def commit_trailers(message: str) -> list[tuple[str, str]]:
    """The git trailers of `message`: the last paragraph, when every line of it is `Key: value`."""
    text = message.replace("\r\n", "\n").strip()
    paragraphs = [p for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
    if len(paragraphs) < 2:
        return []
    trailers: list[tuple[str, str]] = []
    for line in paragraphs[-1].split("\n"):
        if line.startswith("#"):
            continue
        if line[:1] in (" ", "\t") and trailers:
            k, v = trailers[-1]
            trailers[-1] = (k, f"{v} {line.strip()}")
            continue
        m = _TRAILER_RE.match(line)
        if not m:
            return []
        trailers.append((m.group(1), m.group(2).strip()))
    return trailers


def trailer_map(message: str) -> dict[str, str]:
    """Trailer keys lower-cased (git compares them case-insensitively) to their values."""
    return {k.lower(): v for k, v in commit_trailers(message)}


def is_pipeline_commit(message: str) -> bool:
    """True iff the commit was made by this pipeline (its trailer block has `Delivery-Pipeline:`)."""
    return PIPELINE_TRAILER.lower() in trailer_map(message)


