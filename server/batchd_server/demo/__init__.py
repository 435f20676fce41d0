"""The embedded demo: synthetic scenes packed, served and trained on in one command."""

from .cli import DEMO_NAME, demo, ensure_demo_pack

__all__ = ["DEMO_NAME", "demo", "ensure_demo_pack"]
