"""Coordinator side of Hub sources: resolve the revision, list the files, read the headers.

Runs on rank 0 only. One ``model_info`` call pins the revision (branch or tag) to a commit
hash and lists the repository's files with their sizes and hashes; every later request names
that commit, so a branch that moves mid-job cannot split the job across commits. Safetensors
headers are read with HTTP range requests (or from the local cache when the shard is already
there), so planning never waits for a shard download. In offline mode everything comes from
the local cache and no request is made.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distload.checkpoint import (
    INDEX_NAME,
    assemble_index,
    parse_index,
    single_file_index,
)
from distload.errors import CheckpointError
from distload.headers import DEFAULT_MAX_HEADER_BYTES, parse_header
from distload.hub.ref import HubRef, is_commit
from distload.index import CheckpointIndex, FileMeta, TensorMeta
from distload.locate import PICKLE_SUFFIXES, choose_files

log = logging.getLogger(__name__)

HEAD_BLOCK = 64 * 1024  # first range request per shard: the length prefix and most headers


@dataclass(frozen=True)
class RemoteFile:
    """One file of the pinned commit, as the Hub lists it."""

    name: str  # path inside the repository
    size: int
    sha256: str | None = None  # large (LFS) files: sha256 of the content
    git_oid: str | None = None  # small files: git blob id (sha1 of "blob <size>\0" + content)


@dataclass(frozen=True)
class Resolved:
    """A Hub source pinned to one commit: what every rank of the job uses."""

    ref: HubRef
    commit: str
    files: dict[str, RemoteFile] = field(default_factory=dict)  # repo path -> file
    offline: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "repo_id": self.ref.repo_id,
            "revision": self.ref.revision,
            "subfolder": self.ref.subfolder,
            "commit": self.commit,
            "offline": self.offline,
            "files": [[f.name, f.size, f.sha256, f.git_oid] for f in self.files.values()],
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> Resolved:
        ref = HubRef(data["repo_id"], data["revision"], data["subfolder"])
        files = {n: RemoteFile(n, s, h, g) for n, s, h, g in data["files"]}
        return Resolved(ref, data["commit"], files, bool(data["offline"]))

    def path(self, name: str) -> str:
        """Repository path of ``name`` (relative to the weights' subfolder)."""
        return f"{self.ref.subfolder}/{name}" if self.ref.subfolder else name


def repo_dir(cache_dir: str | os.PathLike[str], repo_id: str) -> Path:
    """The repository's folder in a Hub cache (``models--org--name``)."""
    return Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))


def snapshot_dir(cache_dir: str | os.PathLike[str], repo_id: str, commit: str) -> Path:
    """Where a commit's files appear in a Hub cache (symlinks into ``blobs/``)."""
    return repo_dir(cache_dir, repo_id) / "snapshots" / commit


def default_cache_dir() -> str:
    """``HF_HUB_CACHE`` (or ``HF_HOME/hub``), as huggingface_hub resolves it."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set (as huggingface_hub reads it)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


_HTTP_LIBRARIES = ("httpx", "httpx2", "httpcore", "requests", "urllib3")


def is_network_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the Hub could not be reached (no network, DNS, refused, timeout):
    OS errors and the HTTP client libraries' transport errors."""
    root = type(exc).__module__.split(".")[0]
    return isinstance(exc, OSError | TimeoutError) or root in _HTTP_LIBRARIES


class HubClient:
    """Hub access for the coordinator: token, endpoint, cache and offline mode in one place."""

    def __init__(
        self,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        token: str | bool | None = None,
        endpoint: str | None = None,
        offline: bool | None = None,
    ) -> None:
        self.cache_dir = str(cache_dir) if cache_dir is not None else default_cache_dir()
        self.token = token
        self.endpoint = endpoint
        self.offline = hub_offline() if offline is None else offline

    # ---------------------------------------------------------------------------- revision

    def resolve(self, ref: HubRef) -> Resolved:
        """Pin ``ref.revision`` to a commit and list the files there (one request online)."""
        if self.offline:
            return self._resolve_offline(ref)
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError

        api = HfApi(endpoint=self.endpoint, token=self.token)
        try:
            info = api.model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
        except HfHubHTTPError as exc:
            raise CheckpointError(
                f"{ref.url()}: cannot resolve revision {ref.revision!r} of {ref.repo_id} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]})",
                file=ref.url(),
            ) from None
        except Exception as exc:
            if not is_network_error(exc):
                raise
            raise CheckpointError(
                f"{ref.url()}: Hub unreachable ({type(exc).__name__}: {exc}); set "
                "HF_HUB_OFFLINE=1 to load from the local cache",
                file=ref.url(),
            ) from None
        commit = info.sha
        if not commit or not is_commit(commit):
            raise CheckpointError(
                f"{ref.url()}: the Hub returned no commit hash for revision {ref.revision!r}",
                file=ref.url(),
            )
        files = {}
        for sib in info.siblings or []:
            lfs = sib.lfs
            size = lfs.size if lfs is not None else sib.size
            if size is None:
                continue
            files[sib.rfilename] = RemoteFile(
                sib.rfilename, int(size), lfs.sha256 if lfs is not None else None, sib.blob_id
            )
        log.info("%s resolved to commit %s (%d files)", ref.url(), commit, len(files))
        return Resolved(ref, commit, files, offline=False)

    def _resolve_offline(self, ref: HubRef) -> Resolved:
        repo = repo_dir(self.cache_dir, ref.repo_id)
        commit = ref.revision
        if not is_commit(commit):
            ref_file = repo / "refs" / ref.revision
            if not ref_file.is_file():
                raise CheckpointError(
                    f"offline mode (HF_HUB_OFFLINE): revision {ref.revision!r} of "
                    f"{ref.repo_id} is not in the Hub cache {self.cache_dir} (no "
                    f"refs/{ref.revision}); load it once online or pass a commit hash",
                    file=ref.url(),
                )
            commit = ref_file.read_text().strip()
        snap = repo / "snapshots" / commit
        if not snap.is_dir():
            raise CheckpointError(
                f"offline mode (HF_HUB_OFFLINE): commit {commit} of {ref.repo_id} "
                f"(revision {ref.revision!r}) is not in the Hub cache {self.cache_dir}",
                file=ref.url(),
            )
        files = {}
        for path in sorted(snap.rglob("*")):
            if not path.is_file():
                continue
            name = path.relative_to(snap).as_posix()
            blob = os.path.basename(os.path.realpath(path))
            files[name] = RemoteFile(
                name,
                path.stat().st_size,
                blob if len(blob) == 64 else None,
                blob if len(blob) == 40 else None,
            )
        return Resolved(ref, commit, files, offline=True)

    # ----------------------------------------------------------------------------- reading

    def cached(self, resolved: Resolved, name: str) -> Path | None:
        """This machine's cached copy of repo file ``name`` at the pinned commit, if whole."""
        path = snapshot_dir(self.cache_dir, resolved.ref.repo_id, resolved.commit) / name
        expected = resolved.files.get(name)
        try:
            if expected is not None and path.stat().st_size == expected.size:
                return path
        except OSError:
            pass
        return None

    def fetch_small(self, resolved: Resolved, name: str) -> Path:
        """Download (or find in the cache) one small file, e.g. the index, by commit."""
        path = self.cached(resolved, name)
        if path is not None:
            return path
        if self.offline:
            raise missing_offline(resolved, name, self.cache_dir)
        from huggingface_hub import hf_hub_download

        return Path(
            hf_hub_download(
                resolved.ref.repo_id,
                name,
                revision=resolved.commit,
                cache_dir=self.cache_dir,
                token=self.token,
                endpoint=self.endpoint,
            )
        )

    def range_reader(self, resolved: Resolved, name: str) -> Callable[[int, int], bytes]:
        """``read(offset, n)`` over HTTP range requests against the pinned commit; the first
        :data:`HEAD_BLOCK` bytes are fetched once and served from memory."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        url = hf_hub_url(
            resolved.ref.repo_id, name, revision=resolved.commit, endpoint=self.endpoint
        )
        headers = build_hf_headers(token=self.token)
        headers["Accept-Encoding"] = "identity"
        block: dict[str, bytes] = {}

        def fetch(offset: int, n: int) -> bytes:
            h = dict(headers, Range=f"bytes={offset}-{offset + n - 1}")
            out = bytearray()
            with get_session().stream("GET", url, headers=h, follow_redirects=True) as resp:
                hf_raise_for_status(resp)
                skip = offset if resp.status_code == 200 else 0  # server ignored the range
                for chunk in resp.iter_bytes():
                    cut = min(skip, len(chunk))
                    skip -= cut
                    out += chunk[cut:]
                    if len(out) >= n:
                        break
            return bytes(out[:n])

        def read(offset: int, n: int) -> bytes:
            if n <= 0:
                return b""
            if "head" not in block:
                block["head"] = fetch(0, HEAD_BLOCK)
            head = block["head"]
            if offset + n <= len(head):
                return head[offset : offset + n]
            return fetch(offset, n)

        return read

    def header(
        self, resolved: Resolved, name: str, max_header_bytes: int
    ) -> tuple[FileMeta, dict[str, TensorMeta], dict[str, str]]:
        """Validated header of shard ``name`` (repo path): cached copy, else range requests."""
        from distload.headers import read_header

        display = (
            name.removeprefix(f"{resolved.ref.subfolder}/") if resolved.ref.subfolder else name
        )
        local = self.cached(resolved, name)
        if local is not None:
            return read_header(local, display=display, max_header_bytes=max_header_bytes)
        if self.offline:
            raise missing_offline(resolved, name, self.cache_dir)
        remote = resolved.files[name]
        try:
            return parse_header(
                display,
                remote.size,
                self.range_reader(resolved, name),
                max_header_bytes=max_header_bytes,
            )
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(
                f"{resolved.ref.url(resolved.commit)}: cannot read the header of {name!r} "
                f"({type(exc).__name__}: {str(exc)[:300]})",
                file=display,
            ) from None


def missing_offline(resolved: Resolved, name: str, cache_dir: str) -> CheckpointError:
    """The error for a file an offline load needs but the cache lacks."""
    return CheckpointError(
        f"offline mode (HF_HUB_OFFLINE): {name!r} of {resolved.ref.repo_id} at revision "
        f"{resolved.ref.revision!r} (commit {resolved.commit}) is not in the Hub cache "
        f"{cache_dir}",
        file=name,
    )


def choose_weights(resolved: Resolved, variant: str | None = None) -> tuple[str | None, str | None]:
    """(index name, single-file name) of the (``variant``) weights in the ref's subfolder,
    relative to it. Refuses repositories with only pickle-based weights."""
    sub = resolved.ref.subfolder
    prefix = f"{sub}/" if sub else ""
    here = sorted(
        n.removeprefix(prefix)
        for n in resolved.files
        if n.startswith(prefix) and "/" not in n.removeprefix(prefix)
    )
    where = resolved.ref.url(resolved.commit)
    chosen = choose_files(here, variant, where)
    if chosen is not None:
        return chosen
    shards = [n for n in here if n.endswith(".safetensors")]
    pickles = [n for n in here if n.endswith(PICKLE_SUFFIXES)]
    if pickles and not shards:
        raise CheckpointError(
            f"{where} has only pickle-based weights ({pickles[:3]}); distload downloads "
            "safetensors only, because unpickling can run arbitrary code",
            file=where,
        )
    raise CheckpointError(
        f"{where} has no {INDEX_NAME} and no single .safetensors file "
        f"(found: {here[:10]}{' ...' if len(here) > 10 else ''})",
        file=where,
    )


def read_hub_index(
    client: HubClient,
    resolved: Resolved,
    *,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    variant: str | None = None,
) -> CheckpointIndex:
    """Coordinator: the validated index of a pinned Hub source, before any shard download."""
    index_name, single = choose_weights(resolved, variant)
    root = resolved.ref.url(resolved.commit)
    if single is not None:
        return single_file_index(
            root, *client.header(resolved, resolved.path(single), max_header_bytes)
        )
    assert index_name is not None
    raw = client.fetch_small(resolved, resolved.path(index_name)).read_bytes()
    weight_map, total = parse_index(raw, index_name)

    def header_of(file: str) -> tuple[FileMeta, dict[str, TensorMeta], dict[str, str]]:
        check_member(resolved, file, index_name)
        return client.header(resolved, resolved.path(file), max_header_bytes)

    return assemble_index(root, index_name, weight_map, total, header_of)


def check_member(resolved: Resolved, file: object, where: str) -> None:
    """Refuse index entries that are not plain safetensors files of the pinned commit."""
    if not isinstance(file, str) or not file or "\x00" in file or "\\" in file:
        raise CheckpointError(f"{where}: invalid file name {file!r}", file=str(file))
    if file.startswith("/") or ".." in file.split("/"):
        raise CheckpointError(
            f"{where}: file name {file!r} escapes the repository folder "
            "(absolute paths and '..' are refused)",
            file=file,
        )
    if not file.endswith(".safetensors"):
        raise CheckpointError(
            f"{where}: {file!r} is not a .safetensors file; distload downloads safetensors only",
            file=file,
        )
    if resolved.path(file) not in resolved.files:
        if resolved.offline:
            raise CheckpointError(
                f"offline mode (HF_HUB_OFFLINE): {where} names {file!r}, which is not in the "
                f"Hub cache for {resolved.ref.repo_id} at revision {resolved.ref.revision!r} "
                f"(commit {resolved.commit})",
                file=file,
            )
        raise CheckpointError(
            f"{where} names {file!r}, which is not in {resolved.ref.repo_id} at commit "
            f"{resolved.commit}",
            file=file,
        )
