"""Adapters that put an indexer index behind other frameworks' interfaces (each an optional extra)."""
