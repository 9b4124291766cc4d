"""Fetching a file from torchvision's server or a mirror, verified by the hash torchvision itself uses.

A mirror (``COURSE_WEIGHTS_MIRROR``, ``COURSE_CIFAR10_MIRROR``, or ``load_cifar10(mirror=...)``) is a base URL
(``https://…``, ``file://…``) or a local folder; the file's own name is appended
(``<mirror>/resnet18-f37072fd.pth``, ``<mirror>/cifar-10-python.tar.gz``). A file is written under a
temporary name and moved into place only once complete and verified, so an interrupted or wrong download
never sits where a later run would load it.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import urllib.parse
from pathlib import Path

DOWNLOAD_TIMEOUT_S = 10
HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")  # torchvision's resnet18-f37072fd.pth


class DownloadError(OSError):
    """A file could not be fetched, or what came is not the file expected (wrong or truncated)."""


def mirror_url(mirror: str | os.PathLike, filename: str) -> str:
    """``<mirror>/<filename>`` as a URL; a local folder (a path, not a URL) becomes a ``file://`` URL."""
    text = os.fspath(mirror)
    if urllib.parse.urlparse(text).scheme in ("http", "https", "ftp", "file"):
        return text.rstrip("/") + "/" + urllib.parse.quote(filename)
    return (Path(text).expanduser().resolve() / filename).as_uri()


def sha256_prefix_in_name(path: str | os.PathLike) -> str | None:
    """The sha256 prefix torchvision puts in a weights file's name (``f37072fd`` of
    ``resnet18-f37072fd.pth``)."""
    match = HASH_IN_NAME.search(os.path.basename(os.fspath(path)))
    return match.group(1) if match else None


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """The hex digest of a file (45 MB of sha256 take about 0.1 s)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def matches(path: str | os.PathLike, *, sha256_prefix: str | None = None, md5: str | None = None) -> bool:
    """Whether the file's sha256 starts with ``sha256_prefix`` and its md5 is ``md5`` (those given)."""
    if sha256_prefix and not file_digest(path, "sha256").startswith(sha256_prefix):
        return False
    return not md5 or file_digest(path, "md5") == md5


def fetch(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256_prefix: str | None = None,
    md5: str | None = None,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` (a temporary name first), verify it, then move it into place.

    Raises :class:`DownloadError` naming the URL and what was wrong; nothing is left at ``dest`` then.
    """
    from torch.hub import download_url_to_file

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.name}.part{os.getpid()}")
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        try:
            download_url_to_file(url, str(part), hash_prefix=sha256_prefix, progress=progress)
        except RuntimeError as err:  # torch.hub's "invalid hash value (expected ..., got ...)"
            raise DownloadError(
                f"{url} is not the expected file {dest.name} (it is wrong or truncated: {err}); "
                f"nothing was saved. Replace it at the mirror with a complete copy."
            ) from err
        except (OSError, ValueError) as err:  # URLError, timeouts, a missing file:// file, a bad URL
            raise DownloadError(f"cannot fetch {url} ({type(err).__name__}: {err})") from err
        if md5 and file_digest(part, "md5") != md5:
            raise DownloadError(
                f"{url} is not the expected file {dest.name} (its md5 is {file_digest(part, 'md5')}, "
                f"not {md5}: it is wrong or truncated); nothing was saved. Replace it at the mirror "
                f"with a complete copy."
            )
        os.replace(part, dest)
    finally:
        socket.setdefaulttimeout(old_timeout)
        if part.exists():
            part.unlink()
    return dest
