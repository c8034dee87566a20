"""Hub source names: ``org/name``, ``hf://org/name@revision/subfolder`` -> :class:`HubRef`.

Pure string handling, no network and no torch. The coordinator decides whether a ``source``
is a local path or a Hub repository (see :func:`parse_hub_source`) and every rank follows its
decision, so a path that exists on some nodes only can never split a job into two kinds of
load.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from distload.errors import CheckpointError

DEFAULT_REVISION = "main"
PREFIX = "hf://"
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"^(?:{_NAME}/)?{_NAME}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class HubRef:
    """A model repository on the Hub, at a revision as the user named it."""

    repo_id: str  # "org/name"
    revision: str = DEFAULT_REVISION  # branch, tag or commit hash
    subfolder: str = ""  # folder inside the repository holding the weights ("" = top)

    def url(self, commit: str | None = None) -> str:
        """``hf://org/name@rev[/subfolder]``, with the resolved commit when given."""
        sub = f"/{self.subfolder}" if self.subfolder else ""
        return f"{PREFIX}{self.repo_id}@{commit or self.revision}{sub}"


def is_commit(revision: str) -> bool:
    """A full 40-hex commit hash (the only revision form that never moves)."""
    return bool(_COMMIT.match(revision))


def parse_hub_source(
    source: str | os.PathLike[str], revision: str | None = None, subfolder: str | None = None
) -> HubRef | None:
    """The Hub repository ``source`` names, or None when it is a local path.

    ``hf://org/name[@revision][/subfolder]`` is always a Hub source. A bare ``org/name`` is
    one when no such local path exists. ``revision``/``subfolder`` arguments must agree with
    the ones written in the source. Runs on the coordinator (it looks at its filesystem).
    """
    text = os.fspath(source)
    if text.startswith(PREFIX):
        return _parse_url(text, revision, subfolder)
    if Path(text).expanduser().exists():
        return None
    if text.startswith((".", "/", "~")) or text.endswith((".safetensors", ".json")):
        return None
    if text.count("/") != 1 or not _REPO_ID.match(text):
        return None
    return _make(text, revision, None, subfolder)


def _parse_url(text: str, revision: str | None, subfolder: str | None) -> HubRef:
    body = text[len(PREFIX) :].strip("/")
    parts = body.split("/")
    if len(parts) < 2:
        parts.insert(0, "")  # hf://name: a repository without an organisation
    org, name_rev, rest = parts[0], parts[1], parts[2:]
    name, _, written_rev = name_rev.partition("@")
    repo_id = f"{org}/{name}" if org else name
    if not _REPO_ID.match(repo_id):
        raise CheckpointError(f"{text!r}: {repo_id!r} is not a valid Hub repo id", file=text)
    return _make(
        repo_id,
        revision,
        written_rev or None,
        subfolder,
        written_sub="/".join(rest) or None,
        text=text,
    )


def _make(
    repo_id: str,
    revision: str | None,
    written_rev: str | None,
    subfolder: str | None,
    *,
    written_sub: str | None = None,
    text: str | None = None,
) -> HubRef:
    where = text or repo_id
    if revision and written_rev and revision != written_rev:
        raise CheckpointError(
            f"{where!r} names revision {written_rev!r} but revision={revision!r} was passed",
            file=where,
        )
    if subfolder and written_sub and subfolder.strip("/") != written_sub:
        raise CheckpointError(
            f"{where!r} names subfolder {written_sub!r} but subfolder={subfolder!r} was passed",
            file=where,
        )
    sub = (subfolder or written_sub or "").strip("/")
    if ".." in sub.split("/") or "\\" in sub:
        raise CheckpointError(f"{where!r}: subfolder {sub!r} escapes the repository", file=where)
    return HubRef(repo_id, revision or written_rev or DEFAULT_REVISION, sub)
