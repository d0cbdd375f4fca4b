"""A fake Kubernetes API server for the Kubernetes backend's tests (see server.py)."""

from .server import ApiError, FakeKube, rfc3339_nano

__all__ = ["ApiError", "FakeKube", "rfc3339_nano"]
