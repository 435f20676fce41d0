"""What a server says about a dataset: its fields, classes, fingerprint and epoch plan."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._exceptions import TransportError

__all__ = ["DatasetInfo", "FieldInfo", "parse_info"]


@dataclass(frozen=True, kw_only=True, slots=True)
class FieldInfo:
    """One field of a dataset as the server describes it."""

    dtype: str
    shape: tuple[int, ...] | None
    """Per-sample shape; ``None`` when samples vary (the pipeline must make them equal)."""
    role: str | None = None
    encoding: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class DatasetInfo:
    """What ``GET /v1/datasets/{name}`` says, plus this client's epoch plan."""

    name: str
    count: int
    """Samples served: the split's when the client has one, else the pack's."""
    fingerprint: str
    fields: Mapping[str, FieldInfo]
    classes: tuple[str, ...] | None
    batches: int
    """Batches per epoch for this client's rank."""
    samples_per_rank: int
    raw: Mapping[str, Any]
    """The whole JSON answer, for keys this client does not model."""
    pack_count: int = 0
    """Samples in the whole pack (``count`` too without a split)."""
    split: str | None = None
    """The split served (canonical), or None for the whole pack."""


def parse_info(name: str, raw: Any, url: str) -> DatasetInfo:
    try:
        plan = raw["plan"]
        fields = {
            str(k): FieldInfo(
                dtype=str(v["dtype"]),
                shape=None if v.get("shape") is None else tuple(int(s) for s in v["shape"]),
                role=v.get("role"),
                encoding=v.get("encoding"),
            )
            for k, v in (raw.get("fields") or {}).items()
        }
        classes = raw.get("classes")
        split = raw.get("split")
        return DatasetInfo(
            name=str(raw.get("name", name)),
            count=int(raw["count"]),
            pack_count=int(raw.get("pack_count", raw["count"])),
            split=None if split is None else str(split["split"]),
            fingerprint=str(raw["fingerprint"]),
            fields=fields,
            classes=None if classes is None else tuple(str(c) for c in classes),
            batches=int(plan["num_batches"]),
            samples_per_rank=int(plan["samples_per_rank"]),
            raw=raw,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise TransportError(
            f"{url}: dataset info for {name!r} lacks or mistypes {exc}; "
            "is this a batchd server speaking protocol v1 (docs/protocol.md)?"
        ) from exc
