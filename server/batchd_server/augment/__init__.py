"""Augmentation: declarative pipelines of ops, validated at the boundary, random per sample.

The pipeline (:mod:`.pipeline`) chains the ops (:mod:`.ops`, parameters checked by
:mod:`.validators`); a sample in flight is :mod:`.sample`, and crop-and-flip pipelines
take the batch-at-once path of :mod:`.windows`.
"""

from .ops import OPS, Op
from .pipeline import FieldLike, Pipeline

__all__ = ["OPS", "FieldLike", "Op", "Pipeline"]
