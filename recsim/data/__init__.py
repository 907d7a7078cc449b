"""Datasets: readers of real data, the synthetic simulator, preprocessing and the cache."""

from recsim.data.schema import DataFileError, InteractionData

__all__ = ["DataFileError", "InteractionData"]
