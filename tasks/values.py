"""The values-file edit: read and rewrite the image tag in a Helm values file, changing nothing else.

Pure file work (ruamel.yaml's node positions, no git): the GitOps module commits what this writes, and
drift and rollback read tags with `image_tag_in_text` from any revision.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError
from ruamel.yaml.nodes import MappingNode, ScalarNode
from ruamel.yaml.scalarstring import DoubleQuotedScalarString, SingleQuotedScalarString

from delivery.errors import ValuesError
from delivery.log import get_logger

_PLAIN_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")


@dataclass
class BumpResult:
    values_file: Path
    key: str
    old_tag: str
    new_tag: str
    changed: bool
    digest: str | None = None


def _read_values_text(values_file: Path, key: str) -> str:
    try:
        with open(values_file, encoding="utf-8", newline="") as fh:
            return fh.read()
    except FileNotFoundError as e:
        raise ValuesError(f"values file {values_file} not found (looking for key {key})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ValuesError(f"values file {values_file} cannot be read (looking for key {key}): {e}") from e


def _compose(text: str, source: str, key: str) -> MappingNode:
    """Parse `text` into nodes that know where each value sits in the text."""
    try:
        # A full load also catches what composing alone lets through (duplicate keys).
        YAML(typ="rt").load(text)
        root = YAML(typ="rt").compose(text)
    except YAMLError as e:
        detail = " ".join(str(e).split())
        raise ValuesError(f"{source} is not valid YAML (looking for key {key}): {detail}") from e
    if not isinstance(root, MappingNode):
        raise ValuesError(f"{source} is not a YAML mapping (looking for key {key})")
    return root


def _key_parts(key: str) -> list[str]:
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ValuesError(f"invalid key path {key!r}")
    return parts


def _find_node(root: MappingNode, key: str, source: str) -> tuple[MappingNode, ScalarNode, Any]:
    """(parent mapping, key node, value node) of the dotted `key`."""
    parts = _key_parts(key)
    node: Any = root
    parent: MappingNode = root
    key_node: Any = None
    for i, part in enumerate(parts):
        if not isinstance(node, MappingNode):
            where = ".".join(parts[:i])
            raise ValuesError(f"{source}: {where} is not a mapping, so key {key} cannot be found")
        matches = [(k, v) for k, v in node.value if isinstance(k, ScalarNode) and k.value == part]
        if not matches:
            where = ".".join(parts[: i + 1])
            raise ValuesError(f"{source}: key {key} not found ({where} is missing)")
        parent = node
        key_node, node = matches[-1]
    return parent, key_node, node


def _scalar_value(node: Any, key: str, source: str) -> str:
    if not isinstance(node, ScalarNode):
        kind = "mapping" if isinstance(node, MappingNode) else "list"
        raise ValuesError(f"{source}: key {key} holds a {kind}, not an image tag")
    return node.value



def image_tag_in_text(text: str, source: str, key: str = "image.tag") -> str:
    """The image tag at `key` in values `text` (read from `source`, named in errors)."""
    _, _, node = _find_node(_compose(text, source, key), key, source)
    return _scalar_value(node, key, source)


def read_image_tag(values_file: Path, key: str = "image.tag") -> str:
    """The image tag stored at `key` in `values_file`."""
    values_file = Path(values_file)
    return image_tag_in_text(_read_values_text(values_file, key), str(values_file), key)


def _plain_is_string(value: str) -> bool:
    """True when `value` written without quotes reads back as the same string (not a number or a date)."""
    if not _PLAIN_TAG_RE.fullmatch(value):
        return False
    try:
        return YAML(typ="safe").load(f"k: {value}\n") == {"k": value}
    except YAMLError:
        return False


def _render_scalar(value: str, style: str | None) -> str:
    if style == "'":
        return "'" + value.replace("'", "''") + "'"
    if style != '"' and _plain_is_string(value):
        return value
    # A JSON string is a valid YAML double-quoted scalar.
    return json.dumps(value, ensure_ascii=False)


def _single_line(text: str, node: Any) -> bool:
    start, end = node.start_mark.index, node.end_mark.index
    return end > start and "\n" not in text[start:end] and "\r" not in text[start:end]


def _replace_span(text: str, node: Any, new: str) -> str:
    return text[: node.start_mark.index] + new + text[node.end_mark.index :]


def _edit_in_place(text: str, root: MappingNode, key: str, new_tag: str, digest: str | None, source: str) -> str | None:
    """Rewrite only the characters of the tag (and digest) scalars; None when that is not possible."""
    parent, tag_key, tag_node = _find_node(root, key, source)
    if not _single_line(text, tag_node):
        return None
    digest_node = None
    if digest is not None:
        digest_node = next((v for k, v in parent.value if isinstance(k, ScalarNode) and k.value == "digest"), None)
        if digest_node is not None and not (isinstance(digest_node, ScalarNode) and _single_line(text, digest_node)):
            return None
        if digest_node is None:
            line_start = text.rfind("\n", 0, tag_key.start_mark.index) + 1
            if parent.flow_style or text[line_start : tag_key.start_mark.index].strip():
                return None
    # Edit back to front so the earlier marks stay valid.
    edits: list[tuple[int, str]] = []
    if digest is not None and digest_node is not None:
        edits.append((digest_node.start_mark.index, "replace-digest"))
    if tag_node.value != new_tag:
        edits.append((tag_node.start_mark.index, "replace-tag"))
    if digest is not None and digest_node is None:
        edits.append((tag_node.end_mark.index, "insert-digest"))
    for _, what in sorted(edits, reverse=True):
        if what == "replace-tag":
            text = _replace_span(text, tag_node, _render_scalar(new_tag, tag_node.style))
        elif what == "replace-digest":
            text = _replace_span(text, digest_node, _render_scalar(digest or "", digest_node.style or '"'))
        else:
            eol = text.find("\n", tag_node.end_mark.index)
            newline = "\r\n" if eol > 0 and text[eol - 1] == "\r" else "\n"
            line = " " * tag_key.start_mark.column + f"digest: {json.dumps(digest)}"
            if eol < 0:
                text = text + newline + line
            else:
                text = text[: eol + 1] + line + newline + text[eol + 1 :]
    return text


def _detect_mapping_indent(text: str) -> int:
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    for cur, nxt in zip(lines, lines[1:], strict=False):
        body = cur.split(" #")[0].rstrip()
        if body.endswith(":") and not cur.lstrip().startswith("- "):
            i, j = len(cur) - len(cur.lstrip()), len(nxt) - len(nxt.lstrip())
            if j > i and not nxt.lstrip().startswith("- "):
                return j - i
    return 2


def _detect_sequence_indent(text: str) -> tuple[int, int]:
    """(sequence indent, dash offset) as ruamel means them: `key:\\n  - x` is (4, 2)."""
    lines = text.splitlines()
    for prev, cur in zip(lines, lines[1:], strict=False):
        if cur.lstrip().startswith("- ") and prev.rstrip().split(" #")[0].endswith(":"):
            offset = (len(cur) - len(cur.lstrip())) - (len(prev) - len(prev.lstrip()))
            if offset >= 0:
                return offset + 2, offset
    return 4, 2


def _edit_round_trip(text: str, key: str, new_tag: str, digest: str | None, source: str) -> str:
    """Fallback for layouts the in-place edit cannot handle: a full round trip that keeps comments,
    key order, quoting and the file's own indentation."""
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096
    seq, offset = _detect_sequence_indent(text)
    yaml.indent(mapping=_detect_mapping_indent(text), sequence=seq, offset=offset)
    if "\r\n" in text:
        yaml.line_break = "\r\n"
    data = yaml.load(text)
    parts = _key_parts(key)
    parent = data
    for part in parts[:-1]:
        parent = parent[part]
    old = parent[parts[-1]]
    if isinstance(old, SingleQuotedScalarString):
        parent[parts[-1]] = SingleQuotedScalarString(new_tag)
    elif isinstance(old, DoubleQuotedScalarString) or not _plain_is_string(new_tag):
        parent[parts[-1]] = DoubleQuotedScalarString(new_tag)
    else:
        parent[parts[-1]] = new_tag
    if digest is not None:
        if "digest" in parent:
            parent["digest"] = DoubleQuotedScalarString(digest)
        else:
            parent.insert(list(parent.keys()).index(parts[-1]) + 1, "digest", DoubleQuotedScalarString(digest))
    out = StringIO()
    yaml.dump(data, out)
    return out.getvalue()


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def bump_image_tag(values_file: Path, new_tag: str, *, key: str = "image.tag", digest: str | None = None) -> BumpResult:
    """Set the image tag at `key` in a Helm values file to `new_tag`, changing nothing else.

    Only the tag's characters are rewritten (and, with `digest`, a `digest:` line is set or added right
    after the tag), so comments, key order, quoting and indentation stay as they are and the diff is the
    tag line alone. A tag that is already `new_tag` leaves the file untouched.
    """
    values_file = Path(values_file)
    source = str(values_file)
    log = get_logger()
    if not new_tag or any(c in new_tag for c in "\r\n"):
        raise ValuesError(f"refusing to write image tag {new_tag!r} to {source} (key {key})")
    text = _read_values_text(values_file, key)
    root = _compose(text, source, key)
    parent, _, tag_node = _find_node(root, key, source)
    old_tag = _scalar_value(tag_node, key, source)
    old_digest = None
    if digest is not None:
        found = next((v for k, v in parent.value if isinstance(k, ScalarNode) and k.value == "digest"), None)
        old_digest = found.value if isinstance(found, ScalarNode) else None

    if old_tag == new_tag and (digest is None or old_digest == digest):
        log.info(f"{source}: {key} is already {new_tag}; nothing changed")
        return BumpResult(values_file, key, old_tag, new_tag, changed=False, digest=old_digest)

    new_text = _edit_in_place(text, root, key, new_tag, digest, source)
    if new_text is None:
        new_text = _edit_round_trip(text, key, new_tag, digest, source)

    # Never write a file that would not read back as what we meant.
    check_root = _compose(new_text, source, key)
    check_parent, _, check_node = _find_node(check_root, key, source)
    written_digest = next(
        (v.value for k, v in check_parent.value if isinstance(k, ScalarNode) and k.value == "digest"), None
    )
    if _scalar_value(check_node, key, source) != new_tag or (digest is not None and written_digest != digest):
        raise ValuesError(f"{source}: rewriting {key} to {new_tag} did not read back as written; file left as is")

    _write_atomically(values_file, new_text)
    suffix = f" (digest {digest})" if digest else ""
    log.info(f"{source}: {key} {old_tag or '(empty)'} -> {new_tag}{suffix}")
    return BumpResult(values_file, key, old_tag, new_tag, changed=True, digest=digest)


@task(name="bump-image-tag", cache_policy=NO_CACHE)
def bump_image_tag_task(
    values_file: Path, new_tag: str, key: str = "image.tag", digest: str | None = None
) -> BumpResult:
    return bump_image_tag(values_file, new_tag, key=key, digest=digest)
