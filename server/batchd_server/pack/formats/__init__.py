"""Readers for the data people already have: one module per source format.

==========  ===========================================  ==========================
format      what                                         needs
==========  ===========================================  ==========================
folder      an image-folder tree, one subfolder a class  (the server install)
csv         a CSV of image paths and numeric targets     (the server install)
npy         ``.npy`` / ``.npz`` arrays, memory-mapped    (the server install)
tfrecord    TFRecord files of ``tf.train.Example``       ``batchd[tfrecord]``
webdataset  WebDataset ``.tar`` shards                   (the server install)
parquet     Parquet files or folders (Hugging Face);        ``batchd[parquet]``
            a ``datasets`` ``save_to_disk`` folder
hdf5        an HDF5 file's datasets, read in chunks      ``batchd[hdf5]``
==========  ===========================================  ==========================

Array formats (npy, hdf5) go to :func:`~batchd_server.pack.packer.pack_columns`;
record formats (tfrecord, webdataset, parquet) yield
:class:`~batchd_server.pack.stream.Record`\\ s to
:func:`~batchd_server.pack.stream.pack_records`, which decodes their images on the
packer's thread pool. Each module's ``pack_source(paths, out, options)`` is the entry.
An extra that is not installed is named in a one-line :class:`PackError`.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from ...errors import PackError

if TYPE_CHECKING:
    from ..packer import PackOptions, PackSummary

__all__ = ["FORMATS", "Format", "detect", "expand", "list_formats", "pack_format", "require"]


@dataclass(frozen=True)
class Format:
    """One source format: how ``--list-formats`` shows it and what it needs installed."""

    name: str
    what: str
    example: str
    modules: tuple[str, ...] = ()
    extra: str | None = None

    def missing(self) -> list[str]:
        """The modules this format needs that are not importable here."""
        return [m for m in self.modules if importlib.util.find_spec(m) is None]


FORMATS: tuple[Format, ...] = (
    Format("folder", "an image-folder tree, one subfolder per class", "./photos"),
    Format("csv", "a CSV of image paths (and masks) with numeric targets", "./train.csv"),
    Format("npy", ".npy / .npz arrays, memory-mapped (--field NAME=KEY)", "x.npy y.npy"),
    Format(
        "tfrecord",
        "TFRecord files of tf.train.Example, GZIP too (CRC32C checked)",
        "'train-*.tfrecord'",
        ("google_crc32c",),
        "tfrecord",
    ),
    Format(
        "webdataset",
        "WebDataset tar shards (jpg/png/webp, cls, json, npy)",
        "'shard-{000..099}.tar'",
    ),
    Format(
        "parquet",
        "Parquet files or folders (Hugging Face layout), a datasets save_to_disk folder",
        "./train.parquet",
        ("pyarrow",),
        "parquet",
    ),
    Format("hdf5", "an HDF5 file's datasets, read in chunks", "data.h5", ("h5py",), "hdf5"),
)
_BY_NAME = {f.name: f for f in FORMATS}


def list_formats() -> str:
    """The text of ``batchd pack --list-formats``: each format, an example, what it needs."""
    lines = []
    for f in FORMATS:
        if f.extra is None:
            needs = "included"
        elif f.missing():
            needs = f"needs pip install 'batchd[{f.extra}]' (not installed)"
        else:
            needs = f"batchd[{f.extra}] (installed)"
        lines.append(f"{f.name:<11} {f.what}\n{'':<11} e.g. {f.example:<26} {needs}")
    return "\n".join(lines)


def require(fmt: str, module: str) -> ModuleType:
    """Import ``module`` for format ``fmt``, or a one-line PackError naming the extra."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        extra = _BY_NAME[fmt].extra
        raise PackError(
            f"reading {fmt} needs the Python package {module.split('.')[0]}, which is not "
            f"installed: pip install 'batchd[{extra}]'"
        ) from None


def pack_format(name: str, paths: list[Path], out: Path, options: PackOptions) -> PackSummary:
    """Pack ``paths`` of format ``name`` (not folder or csv) into ``out``."""
    if name not in _BY_NAME or name in ("folder", "csv"):
        raise PackError(f"unknown format {name!r}; the formats are {sorted(_BY_NAME)}")
    from ..packer import _check_out

    _check_out(out, paths[0], options.overwrite)
    for p in paths:
        if out.absolute() == p.absolute():
            raise PackError(f"{out}: the output must not be one of the sources")
    module = importlib.import_module(f".{name}", __name__)
    summary: PackSummary = module.pack_source(paths, out, options)
    return summary


_BRACE = re.compile(r"\{([^{}]*)\}")


def _braces(pattern: str) -> list[str]:
    """WebDataset's brace patterns: ``a-{000..003}.tar`` (zero-padded ranges), ``{x,y}``."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = r.group(1), r.group(2)
        if int(hi) < int(lo):
            raise PackError(f"{pattern}: the range {{{body}}} runs backwards")
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [x for item in items for x in _braces(head + item + tail)]


def expand(sources: str | Path | Sequence[str | Path]) -> list[Path]:
    """Paths, globs (``*.tfrecord``) and brace patterns into existing paths, in order.

    A path that exists is taken as it is (even if its name holds ``*`` or braces); a
    pattern that matches nothing, and a plain path that does not exist, are PackErrors.
    """
    items = [sources] if isinstance(sources, str | Path) else list(sources)
    if not items:
        raise PackError("no source given")
    out: list[Path] = []
    for item in items:
        text = str(item)
        if Path(text).exists():
            out.append(Path(text))
            continue
        names = _braces(text)
        matched: list[str] = []
        for name in names:
            if glob.has_magic(name):
                matched.extend(sorted(glob.glob(name)))
            elif Path(name).exists():
                matched.append(name)
            elif len(names) > 1:
                raise PackError(f"{name}: no such file (from the pattern {text})")
        if not matched:
            if len(names) == 1 and not glob.has_magic(text):
                raise PackError(f"{text}: no such file or directory")
            raise PackError(f"{text}: the pattern matches no file")
        out.extend(Path(m) for m in matched)
    return out


_SUFFIXES = (
    (".csv", "csv"),
    (".npy", "npy"),
    (".npz", "npy"),
    (".h5", "hdf5"),
    (".hdf5", "hdf5"),
    (".he5", "hdf5"),
    (".parquet", "parquet"),
    (".pq", "parquet"),
    (".tar", "webdataset"),
    (".tar.gz", "webdataset"),
    (".tgz", "webdataset"),
)


def _format_of(path: Path) -> str | None:
    if path.is_dir():
        # Parquet files at the top or one level down (a Hugging Face dataset's data/); no
        # deeper walk, which in a big image tree would list every file before packing.
        patterns = ("*.parquet", "*.pq", "*/*.parquet", "*/*.pq")
        has_parquet = any(next(path.glob(pat), None) is not None for pat in patterns)
        saved = (path / "state.json").exists() or (path / "dataset_dict.json").exists()
        return "parquet" if has_parquet or saved else "folder"
    name = path.name.lower()
    if ".tfrecord" in name:  # train.tfrecord, x.tfrecords, a.tfrecord-00001-of-00004, .gz
        return "tfrecord"
    for suffix, fmt in _SUFFIXES:
        if name.endswith(suffix):
            return fmt
    return None


def detect(paths: list[Path]) -> str:
    """The format of ``paths`` from their names: one format for all, or a PackError."""
    found = {p: _format_of(p) for p in paths}
    unknown = [p for p, f in found.items() if f is None]
    if unknown:
        raise PackError(
            f"{unknown[0]}: cannot tell its format from the name; give an image-folder tree "
            "(a directory) or a .csv file, or a file of another format (batchd pack "
            f"--list-formats lists them), or name it with --format ({', '.join(_BY_NAME)})"
        )
    kinds = sorted({f for f in found.values() if f is not None})
    if len(kinds) > 1:
        raise PackError(f"the sources mix formats ({', '.join(kinds)}); pack one format at a time")
    return kinds[0]
