"""Shared fixtures. Area-specific helpers live beside their tests."""

from __future__ import annotations

import os

# Keras reads its backend once, at import: pin it before any test imports keras.
os.environ.setdefault("KERAS_BACKEND", "torch")
