"""Files and folders named by a local path or by the Hugging Face hub, found without waiting on a
network that is not there: offline (HF_HUB_OFFLINE, or the hub's host does not resolve) only the local
cache is read, so a missing file fails at once with a message saying how to provide it."""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from shortft.errors import MissingFileError


@functools.cache
def hub_reachable() -> bool:
    """True unless offline mode is set or the hub's host does not resolve (fail fast instead of
    huggingface_hub's retries with backoff)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def split_hub_file(spec: str) -> tuple[str, str] | None:
    """'org/repo/sub/file.ext' -> ('org/repo', 'sub/file.ext'); None when it cannot be one."""
    parts = str(spec).split("/")
    if len(parts) < 3 or str(spec).startswith(("/", ".", "~")):
        return None
    return "/".join(parts[:2]), "/".join(parts[2:])


def hub_file(spec: str | os.PathLike, what: str, how: str, repo_type: str | None = None,
             error: type[Exception] = MissingFileError) -> Path:
    """A local file, or `repo_id/filename` from the hub (cache first). `what` names the file in the
    error, `how` says how to provide it instead (e.g. "pass the local path with --shortcut")."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    parts = split_hub_file(str(spec))
    if parts is None:
        raise error(f"{what} {str(spec)!r} does not exist (neither a local file nor 'repo_id/filename' on the "
                    f"hub); {how}")
    repo, filename = parts
    from huggingface_hub import hf_hub_download

    return Path(_cache_then_hub(lambda local: hf_hub_download(repo, filename, repo_type=repo_type,
                                                              local_files_only=local),
                                f"{what} {str(spec)!r} (file {filename!r} of hub repo {repo!r})", how, error))


def hub_folder(spec: str, what: str, how: str, allow_patterns: list[str] | None = None,
               error: type[Exception] = MissingFileError) -> Path:
    """A local folder, or a hub repo id downloaded (or found in the cache) as a folder."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if str(spec).startswith(("/", ".", "~")) or str(spec).count("/") != 1:
        raise error(f"{what} {spec!r} does not exist (neither a local folder nor a hub id like 'org/name'); {how}")
    from huggingface_hub import snapshot_download

    return Path(_cache_then_hub(lambda local: snapshot_download(spec, allow_patterns=allow_patterns,
                                                                local_files_only=local), f"{what} {spec!r}", how, error))


def _cache_then_hub(fetch, what: str, how: str, error: type[Exception]) -> str:
    """`fetch(local_only)` from the local cache; only if it is not there, and the hub is reachable, from the
    network. A model that is in the cache never touches the network, one that is not fails at once offline."""
    try:
        return fetch(True)
    except Exception as cached_err:  # not in the cache (LocalEntryNotFoundError and kin)
        if not hub_reachable():
            raise error(f"{what} is not in the local hub cache and the hub cannot be reached (offline); download "
                        f"it on a machine with network (huggingface-cli download), or {how}") from cached_err
    try:
        return fetch(False)
    except Exception as err:  # gated, missing, network failure: all end the same way for the user
        raise error(f"{what} could not be downloaded ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                    f"download it yourself, or {how}") from err
