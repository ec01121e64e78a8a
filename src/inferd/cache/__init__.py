"""The content-addressed model store: fetch and verify sources, convert, record provenance."""

from inferd.cache.prepare import PreparedModel, prepare
from inferd.cache.reporting import SILENT, Reporter
from inferd.cache.store import ModelStore

__all__ = ["SILENT", "ModelStore", "PreparedModel", "Reporter", "prepare"]
