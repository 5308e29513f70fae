"""Data: chat samples and their loaders, threat scenarios, and the data files the project ships."""

from spf.data.samples import ChatSample, DataError, load_samples, save_samples

__all__ = ["ChatSample", "DataError", "load_samples", "save_samples"]
