"""``batchd pack``, ``batchd inspect`` and ``batchd verify``.

Commands raise BatchdError subclasses (PackError, FormatError, ConfigError);
``cli.main`` turns them into ``error: ...`` on stderr and exit status 1.
The packer and OpenCV are imported inside the commands so ``batchd --help`` stays quick.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click

from ..errors import ConfigError

__all__ = ["inspect_cmd", "pack_cmd", "verify_cmd"]


def _parse_size(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[int, int] | None:
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", value)
    if not m:
        raise click.BadParameter(f"{value!r}: give HEIGHTxWIDTH, e.g. 64x64")
    return int(m.group(1)), int(m.group(2))


def _parse_fields(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[tuple[str, str], ...]:
    out = []
    for item in value:
        name, eq, key = item.partition("=")
        if not eq or not name.strip() or not key.strip():
            raise click.BadParameter(f"{item!r}: give NAME=KEY, e.g. image=x_train")
        out.append((name.strip(), key.strip()))
    return tuple(out)


def _parse_shapes(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[tuple[str, tuple[int, ...]], ...]:
    out = []
    for item in value:
        name, eq, dims = item.partition("=")
        m = re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", dims)
        if not eq or not name.strip() or not m or any(int(d) == 0 for d in dims.split(",")):
            raise click.BadParameter(f"{item!r}: give NAME=D1,D2,..., e.g. image_raw=28,28,1")
        out.append((name.strip(), tuple(int(d) for d in dims.split(","))))
    return tuple(out)


def _list_formats(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from .formats import list_formats

    click.echo(list_formats())
    ctx.exit(0)


def _check_sources(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[str, ...]:
    import glob

    for item in value:
        # Globs and brace patterns are expanded by the packer; a plain path must exist.
        if not glob.has_magic(item) and "{" not in item and not Path(item).exists():
            raise click.BadParameter(f"Path {item!r} does not exist.", ctx, param)
    return value


@click.command("pack")
@click.argument("source", nargs=-1, required=True, callback=_check_sources)
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--list-formats",
    is_flag=True,
    is_eager=True,
    expose_value=False,
    callback=_list_formats,
    help="List the source formats, an example of each, and what each needs installed.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["folder", "csv", "npy", "tfrecord", "webdataset", "parquet", "hdf5"]),
    help="The source's format, when its names do not tell (default: from the names).",
)
@click.option(
    "--field",
    "fields",
    multiple=True,
    metavar="NAME=KEY",
    callback=_parse_fields,
    help="Arrays, features, columns: take only KEY (an npz member, HDF5 dataset, feature, "
    "column or tar extension) as field NAME; repeat for more. Default: all, by their keys.",
)
@click.option(
    "--feature-shape",
    "feature_shapes",
    multiple=True,
    metavar="NAME=D,D,...",
    callback=_parse_shapes,
    help="Reshape each sample of a field, e.g. raw TFRecord bytes: image_raw=28,28,1.",
)
@click.option(
    "--mode",
    type=click.Choice(["raw", "encoded"]),
    default="raw",
    show_default=True,
    help="raw: decode once to fixed-size pixels (fastest to serve); "
    "encoded: keep the original bytes, any size.",
)
@click.option(
    "--size",
    metavar="HxW",
    callback=_parse_size,
    help="raw mode: bring every image to this size. "
    "Default: the first image's size (others refused).",
)
@click.option(
    "--resize-policy",
    type=click.Choice(["resize", "center-crop", "letterbox"]),
    default="resize",
    show_default=True,
    help="How --size is reached; masks always use nearest-neighbour.",
)
@click.option(
    "--channels",
    type=click.Choice(["3", "1"]),
    default="3",
    show_default=True,
    help="Image channels: 3 (RGB) or 1 (grey, served as HxWx1); sources are converted.",
)
@click.option(
    "--label-from-folder",
    type=click.Choice(["class", "int", "float"]),
    default="class",
    show_default=True,
    help="Folder tree: class numbers the folders in sorted order; int/float store each "
    "folder's name as the number itself (counts 0/ 1/ ... 12/, scores).",
)
@click.option(
    "--keep-empty-classes",
    is_flag=True,
    help="Folder tree: keep class folders with no files as classes (left out by default).",
)
@click.option(
    "--mask-column", metavar="COLUMN", help="CSV source: the column of mask paths (field 'mask')."
)
@click.option(
    "--on-error",
    type=click.Choice(["stop", "skip"]),
    default="stop",
    show_default=True,
    help="A bad image: stop, or skip it and record it in the dataset.",
)
@click.option(
    "--max-skipped",
    default="1%",
    show_default=True,
    metavar="N|P%",
    help="With --on-error skip: fail (writing nothing) once more than this many inputs, "
    "or this share of them, were skipped.",
)
@click.option(
    "--workers", type=click.IntRange(min=1), help="Decode threads (default: one per core)."
)
@click.option(
    "--overwrite", is_flag=True, help="Replace OUT if it is an existing dataset (atomically)."
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def pack_cmd(
    source: tuple[str, ...],
    out: Path,
    fmt: str | None,
    fields: tuple[tuple[str, str], ...],
    feature_shapes: tuple[tuple[str, tuple[int, ...]], ...],
    mode: str,
    size: tuple[int, int] | None,
    resize_policy: str,
    channels: str,
    label_from_folder: str,
    keep_empty_classes: bool,
    mask_column: str | None,
    on_error: str,
    max_skipped: str,
    workers: int | None,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Pack SOURCE (an image-folder tree, a .csv, or another format's files) into the
    dataset directory OUT.

    \b
    A folder tree: one subfolder per class -> fields image + label (int64 class
    index, or the folder's number with --label-from-folder int|float).
    A CSV: an image path column (image, path or filename), optional --mask-column,
    every other column a numeric target; paths are relative to the CSV's folder.
    Also .npy/.npz, TFRecord, WebDataset .tar shards, Parquet and HDF5: several
    files, globs ('train-*.tfrecord') and brace patterns ('shard-{000..009}.tar');
    --list-formats says what each needs installed.
    """
    from .packer import PackOptions, pack

    if size is not None and mode != "raw":
        raise ConfigError(
            "--size applies to --mode raw only; encoded mode keeps each image's own size"
        )
    options = PackOptions(
        mode=mode,  # type: ignore[arg-type]  # click.Choice checked it
        size=size,
        resize_policy=resize_policy,  # type: ignore[arg-type]
        channels=int(channels),
        on_error=on_error,  # type: ignore[arg-type]
        max_skipped=max_skipped,
        label_from_folder=label_from_folder,  # type: ignore[arg-type]
        keep_empty_classes=keep_empty_classes,
        overwrite=overwrite,
        workers=workers,
        progress=False if quiet else None,
        fields=fields,
        feature_shapes=feature_shapes,
    )
    summary = pack(list(source), out, mask_column=mask_column, options=options, fmt=fmt)
    click.echo(str(summary))


def _describe(path: Path) -> dict[str, Any]:
    from ..format import open_dataset

    with open_dataset(path) as ds:
        return {
            "path": str(ds.path),
            "name": ds.name,
            "count": ds.count,
            "fingerprint": ds.fingerprint,
            "bytes": sum(p.stat().st_size for p in ds.path.iterdir() if p.is_file()),
            "classes": ds.classes,
            "fields": [f.to_json() for f in ds.fields.values()],
            "packing": ds.header["packing"],
            "skipped": ds.header["skipped"],
        }


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def inspect_cmd(path: Path, as_json: bool) -> None:
    """Describe the dataset at PATH: count, fields, classes, size, fingerprint, how it
    was packed."""
    info = _describe(path)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    lines = [
        f"dataset      {info['name']}  ({info['path']})",
        f"samples      {info['count']:,}",
        f"on disk      {info['bytes']:,} bytes",
        f"fingerprint  {info['fingerprint']}",
        "fields",
    ]
    for f in info["fields"]:
        shape = "variable (encoded image)" if f["shape"] is None else tuple(f["shape"])
        lines.append(
            f"  {f['name']:<14} {f['dtype']:<5} {shape!s:<26} "
            f"role={f['role']} encoding={f['encoding']}"
        )
    if info["classes"] is not None:
        shown = ", ".join(info["classes"][:20]) + (" ..." if len(info["classes"]) > 20 else "")
        lines.append(f"classes      {len(info['classes'])}: {shown}")
    packing = ", ".join(f"{k}={v}" for k, v in info["packing"].items() if v is not None)
    lines.append(f"packed       {packing}")
    lines.append(f"skipped      {len(info['skipped'])}")
    lines.extend(f"  {s['source']}: {s['reason']}" for s in info["skipped"][:10])
    if len(info["skipped"]) > 10:
        lines.append(f"  ... {len(info['skipped']) - 10} more (--json lists all)")
    click.echo("\n".join(lines))


@click.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def verify_cmd(path: Path, quiet: bool) -> None:
    """Re-read every file of the dataset at PATH against its checksums (exit 1 names the
    bad chunk)."""
    import sys

    from ..format import open_dataset, verify

    verify(path, progress=False if quiet else sys.stderr.isatty())
    with open_dataset(path) as ds:
        click.echo(
            f"ok: {ds.name}: {ds.count:,} samples, {len(ds.header['files'])} data files, "
            f"fingerprint {ds.fingerprint}"
        )
