"""A local Hugging Face hub for the real huggingface_hub client (see server.py)."""

from .server import FakeHub

__all__ = ["FakeHub"]
