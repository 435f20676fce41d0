"""``GET /v1/datasets/{name}``: a pack's facts, and with parameters its epoch plan."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .request import BatchRequest

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["dataset_info"]


async def dataset_info(
    engine: Engine,
    name: str,
    *,
    batch_size: int | None = None,
    shuffle: bool = True,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    augment: str | None = None,
    split: str | None = None,
    split_seed: int = 0,
    stratify: str | None = None,
) -> dict[str, Any]:
    """Dataset facts; with ``batch_size`` the epoch plan, with ``augment`` the batch fields.

    With ``split``, ``count`` and the plan are the split's (``pack_count`` is the pack's).
    """
    # Every parameter given is checked, whether or not a plan is asked for; with a
    # batch_size the plan is the one a batch request of these parameters would build
    # (Engine.prepare), its body cap included.
    probe = BatchRequest(
        dataset=name,
        k=0,
        batch_size=1 if batch_size is None else batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
        split=split,
        split_seed=split_seed,
        stratify=stratify,
        augment="[]" if augment is None else augment,
    )
    ds = await engine.dataset(name)
    ids = await engine.split_ids.ids(ds, probe)
    count = ds.count if ids is None else len(ids)
    out: dict[str, Any] = {
        "name": name,
        "count": count,
        "pack_count": ds.count,
        "split": None
        if probe.split is None
        else {"split": probe.split, "split_seed": split_seed, "stratify": stratify},
        "fingerprint": ds.fingerprint,
        "classes": list(ds.classes) if ds.classes is not None else None,
        "fields": {
            f.name: {
                "dtype": np.dtype(f.dtype).str,
                "shape": list(f.shape) if f.shape is not None else None,
                "role": f.role,
                "encoding": f.encoding,
            }
            for f in ds.fields.values()
        },
    }
    prep = engine.prepare(probe, ds, ids) if batch_size is not None else None
    if augment is not None:
        fields = prep.out_fields if prep else engine.output_fields(ds, engine.pipeline(augment))
        out["batch_fields"] = {
            n: {"dtype": dt.str, "shape": list(shape)} for n, (dt, shape) in fields.items()
        }
    if prep is not None:
        plan = prep.plan
        out["plan"] = {
            "batch_size": batch_size,
            "shuffle": shuffle,
            "drop_last": drop_last,
            "rank": rank,
            "world_size": world_size,
            "samples_per_rank": plan.samples_per_rank,
            "num_batches": plan.num_batches,
            "padded": plan.padded,
            "dropped": plan.dropped,
        }
    return out
