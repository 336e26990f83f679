"""Offline feature store: per-token target hidden states and logits in sharded Zarr v3."""
