"""What a client asks for: the parameters that decide a batch's bytes, checked on creation.

Everything here is checked before any request is sent, with the limits and the split
grammar of the wire contract (:mod:`batchd.wire`), so a mistake fails at
``Client(...)``, not at the first batch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._transport import parse_url
from .wire import MAX_SEED, check_int, format_split, parse_split

__all__ = ["Params", "augment_json", "flag", "split_params", "urls_of"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Params:
    """Everything that decides which bytes a batch holds (besides epoch and index)."""

    dataset: str
    batch_size: int
    seed: int
    shuffle: bool
    drop_last: bool
    augment: str
    """The pipeline as compact, key-sorted JSON: identical pipelines give identical URLs."""
    rank: int
    world_size: int
    split: str | None = None
    """Canonical (``[:80%]``); None is the whole pack, and then the two below are defaults."""
    split_seed: int = 0
    stratify: str | None = None

    def plan_query(self) -> dict[str, str]:
        # The pipeline too: the server validates it (an early 400) and lists its outputs.
        query = {
            "batch_size": str(self.batch_size),
            "shuffle": flag(self.shuffle),
            "drop_last": flag(self.drop_last),
            "rank": str(self.rank),
            "world_size": str(self.world_size),
            "augment": self.augment,
        }
        if self.split is not None:  # whole-pack URLs stay what they were
            query["split"] = self.split
            query["split_seed"] = str(self.split_seed)
            if self.stratify is not None:
                query["stratify"] = self.stratify
        return query

    def batch_query(self, epoch: int) -> dict[str, str]:
        return {"seed": str(self.seed), "epoch": str(epoch), **self.plan_query()}


def flag(value: bool) -> str:
    return "true" if value else "false"


def augment_json(augment: Sequence[Mapping[str, Any]] | None) -> str:
    steps = list(augment or [])
    for i, step in enumerate(steps):
        if not isinstance(step, Mapping) or not isinstance(step.get("op"), str):
            raise ValueError(
                f"augment[{i}] = {step!r}: each step must be a dict with an 'op' name, "
                'e.g. {"op": "hflip", "p": 0.5}'
            )
    try:
        return json.dumps(steps, separators=(",", ":"), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"augment must be plain JSON (numbers, strings, lists): {exc}") from exc


def split_params(
    split: str | None, split_seed: int, stratify: str | None
) -> tuple[str | None, int, str | None]:
    """(canonical split, split seed, stratify), or ValueError before any request is sent."""
    seed = check_int("split_seed", split_seed, 0, MAX_SEED)
    if stratify is not None and (not isinstance(stratify, str) or not stratify):
        raise ValueError(f"stratify must be a field name such as 'label', got {stratify!r}")
    if split is None:
        if stratify is not None:
            raise ValueError("stratify only cuts a split: give split too, e.g. split='[:80%]'")
        return None, 0, None
    return format_split(parse_split(split)), seed, stratify


def urls_of(urls: str | Sequence[str]) -> tuple[str, ...]:
    out = (urls,) if isinstance(urls, str) else tuple(urls)
    if not out:
        raise ValueError("give at least one server URL, e.g. 'http://127.0.0.1:8000'")
    for url in out:
        parse_url(url)  # fail at construction, not at the first batch
    return out
