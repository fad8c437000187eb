"""The Zarr run store (schema in :mod:`montrage.storage.schema`)."""
from montrage.storage.store import CheckpointRecord, RunStore, StoreDims

__all__ = ["CheckpointRecord", "RunStore", "StoreDims"]
