"""The share protocol: folders, claims, heartbeats, submit and status. Imports no torch, so it starts fast."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("loraspool")
except _metadata.PackageNotFoundError:  # run from a checkout that was never pip-installed
    __version__ = "unknown"
