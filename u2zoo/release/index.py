"""A release's ``index.json``: what each published file is and how well it does, in a versioned
schema that ``u2zoo fetch --index`` resolves. Reading an index is strict: an unknown schema
version or a malformed entry is refused, naming the field, never guessed around."""

from __future__ import annotations

import difflib
import json
import re
from typing import Any

from u2zoo.errors import ConfigError

INDEX_SCHEMA = "u2zoo.release-index"
INDEX_SCHEMA_VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")
# {key: type} of every entry; `files` items are {path, sha256, size}
_ENTRY_FIELDS = {
    "name": str,
    "version": str,
    "target": str,
    "precision": str,
    "status": str,
    "file": str,
    "sha256": str,
    "size_bytes": int,
    "files": list,
    "contract": dict,
    "weights": dict,
}
ENTRY_STATUSES = ("ok", "unavailable")


def index_error(where: str, problem: str) -> ConfigError:
    return ConfigError(f"{where}: not a u2zoo release index: {problem}")


def check_index(index: Any, where: str = "index.json") -> dict[str, Any]:
    """Return ``index`` if it is a release index this version reads; else one error naming why."""
    if not isinstance(index, dict):
        raise index_error(where, "the top level is not a JSON object")
    if index.get("schema") != INDEX_SCHEMA:
        raise index_error(where, f"schema {index.get('schema')!r}, expected {INDEX_SCHEMA!r}")
    if index.get("schema_version") != INDEX_SCHEMA_VERSION:
        raise ConfigError(
            f"{where}: release index schema version {index.get('schema_version')!r} is not one this u2zoo "
            f"reads ({INDEX_SCHEMA_VERSION}); upgrade u2zoo or use an index written by this version"
        )
    entries = index.get("entries")
    if not isinstance(entries, list) or not entries:
        raise index_error(where, "'entries' must be a non-empty list")
    for i, entry in enumerate(entries):
        _check_entry(entry, f"{where}: entries[{i}]")
    return index


def _check_entry(entry: Any, where: str) -> None:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} is not an object")
    for key, kind in _ENTRY_FIELDS.items():
        if not isinstance(entry.get(key), kind) or isinstance(entry.get(key), bool):
            raise ConfigError(f"{where}: '{key}' is missing or not {kind.__name__}")
    if entry["status"] not in ENTRY_STATUSES:
        raise ConfigError(f"{where}: status {entry['status']!r} is not one of {', '.join(ENTRY_STATUSES)}")
    if not _SHA256.fullmatch(entry["sha256"]):
        raise ConfigError(f"{where}: 'sha256' is not a sha256 (64 lowercase hex digits)")
    for j, item in enumerate(entry["files"]):
        if not (
            isinstance(item, dict)
            and isinstance(item.get("path"), str)
            and isinstance(item.get("size"), int)
            and _SHA256.fullmatch(str(item.get("sha256")))
        ):
            raise ConfigError(f"{where}: files[{j}] must have a 'path', a 'size' and a 'sha256'")
        if item["path"].startswith("/") or ".." in item["path"].split("/"):
            raise ConfigError(f"{where}: files[{j}] path {item['path']!r} leaves the release folder")
    if entry["file"] not in {item["path"] for item in entry["files"]}:
        raise ConfigError(f"{where}: 'file' {entry['file']!r} is not among its 'files'")


def load_index_text(text: str, where: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise index_error(where, f"invalid JSON ({exc})") from None
    return check_index(data, where)


def _version_key(version: str) -> tuple:
    """Versions sort numerically part by part ("10" after "9"), text after numbers."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.\-]", version))


def _choices(values: set[str]) -> str:
    return ", ".join(sorted(values)) or "none"


def _suggest(value: str, values: set[str]) -> str:
    close = difflib.get_close_matches(value, sorted(values), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def resolve(
    index: dict[str, Any], name: str, target: str, precision: str, version: str | None = None
) -> dict[str, Any]:
    """The one entry for ``name``/``target``/``precision`` (the newest version unless one is
    named); anything not in the index is refused with a did-you-mean and the list of what is."""
    entries = index["entries"]
    steps = (("name", name), ("target", target), ("precision", precision))
    chosen: list[str] = []
    for key, wanted in steps:
        there = {e[key] for e in entries}
        if wanted not in there:
            scope = f" for {' '.join(chosen)}" if chosen else ""
            raise ConfigError(
                f"{key} {wanted!r} is not in the index{scope}{_suggest(wanted, there)}; it has: {_choices(there)}"
            )
        entries = [e for e in entries if e[key] == wanted]
        chosen.append(wanted)
    if version is not None:
        there = {e["version"] for e in entries}
        if version not in there:
            raise ConfigError(
                f"version {version!r} of {name} {target} {precision} is not in the index"
                f"{_suggest(version, there)}; it has: {_choices(there)}"
            )
        entries = [e for e in entries if e["version"] == version]
    newest = max(entries, key=lambda e: _version_key(e["version"]))
    return newest


def describe_entries(index: dict[str, Any]) -> list[str]:
    """One line per entry: what ``fetch`` can ask for."""
    return [
        f"{e['name']} {e['target']} {e['precision']} v{e['version']} ({e['status']})"
        for e in sorted(index["entries"], key=lambda e: (e["name"], e["target"], e["precision"], e["version"]))
    ]
