"""inferd: an open, engine-neutral inference microservice."""

from __future__ import annotations

__all__ = ["__version__"]


def __getattr__(name: str) -> str:
    # Looked up on first use, not on import: importlib.metadata costs about 0.1 s, and every
    # engine start imports this package (its launch shim, `inferd.engines.launch`) where the
    # version is never asked for.
    if name != "__version__":
        raise AttributeError(f"module 'inferd' has no attribute {name!r}")
    from importlib import metadata

    try:
        version = metadata.version("inferd")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        version = "0.0.0+unknown"
    globals()["__version__"] = version
    return version
