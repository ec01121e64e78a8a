"""Model descriptions, their profiles, hardware detection and profile selection."""

from inferd.catalog.catalog import Catalog
from inferd.catalog.hardware import Hardware
from inferd.catalog.schema import ModelEntry, Profile, Source

__all__ = ["Catalog", "Hardware", "ModelEntry", "Profile", "Source"]
