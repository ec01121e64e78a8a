"""inferd: an open, engine-neutral inference microservice."""

from importlib import metadata

try:
    __version__ = metadata.version("inferd")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
