"""The datasets a server serves: every pack directory directly under ``--data``.

A directory there that is not a pack (no header: an empty folder, a folder of images
copied in by mistake, a folder of packs one level too high) is listed as unavailable
with the reason, so ``serving 0 datasets`` never comes without a why (issue 16).
Hidden names, plain files and ``lost+found`` are not listed.

A name from a request is never joined to a path: it is validated, then looked up in
the table built by scanning ``--data``, so no request can reach outside it.

The table is refreshed by :meth:`Registry.rescan` (on list, at most every
``rescan_interval`` seconds); a request naming a dataset the table does not hold looks
for that one directory (the name is validated first), and each lookup compares the
directory's on-disk stamp (inode, mtime, size of every file) with the one it was
opened from. A replaced pack is re-opened; the old :class:`Dataset` object is not
closed, so batches already computing on it finish on the old mapping (the kernel
keeps the old inode's pages while they are mapped) and are never half old, half new.
Its memory maps go away when the last batch holding it is done.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DatasetUnavailable, FormatError, InvalidName, UnknownDataset
from ..format import HEADER_NAME, Dataset, open_dataset

__all__ = ["Entry", "Registry", "check_name", "check_root"]

log = logging.getLogger("batchd.registry")

_MAX_NAME_BYTES = 255
# Describing a folder that is not a pack looks at this many of its entries, no more:
# a folder of a million images is listed as cheaply as an empty one.
_COUNT_AT_MOST = 1000
# Directories a filesystem makes itself: not a user's mistake, never listed.
_NOT_LISTED = frozenset({"lost+found"})

Stamp = tuple[tuple[str, int, int, int], ...]


def check_name(name: str) -> None:
    """Refuse a dataset name that could be a path or is not a plain directory name."""
    raw = name.encode("utf-8", "surrogateescape")
    if not name:
        raise InvalidName("the dataset name is empty")
    if len(raw) > _MAX_NAME_BYTES:
        raise InvalidName(
            f"dataset name is {len(raw)} bytes; names are at most {_MAX_NAME_BYTES} bytes",
        )
    bad = [c for c in ("/", "\\", "\x00") if c in name]
    if bad or name in (".", "..") or name.startswith("."):
        raise InvalidName(
            f"dataset name {name!r} is not a plain directory name "
            "(no '/', '\\', NUL, '..' or leading '.'); list datasets with GET /v1/datasets",
        )


def _stamp(path: Path) -> Stamp:
    """What changes when a pack is replaced or rewritten: every file's inode, mtime, size."""
    st = path.stat()
    items = [("", st.st_ino, st.st_mtime_ns, st.st_size)]
    with os.scandir(path) as it:
        for e in it:
            s = e.stat()
            items.append((e.name, s.st_ino, s.st_mtime_ns, s.st_size))
    return tuple(sorted(items))


def _dir_stamp(path: Path) -> Stamp:
    """A folder's own inode and mtime: they change when an entry is added, removed or renamed."""
    st = path.stat()
    return (("", st.st_ino, st.st_mtime_ns, 0),)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _why_not_a_pack(path: Path) -> str:
    """What the folder ``path`` (directly under a root, no header in it) is instead.

    Looks at most at ``_COUNT_AT_MOST`` of its entries, and nothing deeper than its
    subfolders' headers.
    """
    try:
        if not path.resolve(strict=True).is_relative_to(path.parent):
            return "a symlink leading outside the data folder, not a batchd pack"
        files = folders = 0
        packs: list[str] = []
        capped = False
        with os.scandir(path) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                if files + folders >= _COUNT_AT_MOST:
                    capped = True
                    break
                if e.is_dir():
                    folders += 1
                    if os.path.isfile(os.path.join(e.path, HEADER_NAME)):
                        packs.append(e.name)
                else:
                    files += 1
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        return f"a folder that cannot be read ({why}), not a batchd pack"
    except RuntimeError:  # a symlink loop
        return "a symlink loop, not a batchd pack"
    if packs:
        packs.sort()
        shown = ", ".join(packs[:3]) + (", ..." if len(packs) > 3 else "")
        what = (
            f"the pack {shown}" if len(packs) == 1 else f"{_plural(len(packs), 'pack')} ({shown})"
        )
        return (
            f"a folder that holds {what}, not a pack itself: pass it as --data to serve "
            f"{'it' if len(packs) == 1 else 'them'}"
        )
    if capped:
        what = f"{_COUNT_AT_MOST}+ entries"
    elif files + folders == 0:
        return "an empty folder, not a batchd pack"
    else:
        what = " and ".join(_plural(n, w) for n, w in ((files, "file"), (folders, "folder")) if n)
    return (
        f"a folder of {what} without {HEADER_NAME}: not a batchd pack; "
        "make one with `batchd pack SOURCE OUT`"
    )


def _escapes(path: Path) -> str | None:
    """Why ``path`` (a pack directly under a root) reaches outside that root, or None.

    A symlink under --data (the pack itself or one of its files) that leads elsewhere
    would serve files nobody put in the data folder; such a pack is refused with this
    reason (issue 7). Symlinks that stay inside the root are fine.
    """
    root = path.parent
    try:
        if not path.resolve(strict=True).is_relative_to(root):
            return "a symlink leading outside the data folder; move or copy the pack into it"
        with os.scandir(path) as it:
            for e in it:
                if e.is_symlink() and not Path(e.path).resolve().is_relative_to(root):
                    return f"{e.name}: a symlink leading outside the data folder"
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        return f"cannot be resolved: {exc}"
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """One directory under ``--data``: an open dataset, or why it could not be opened.

    ``pack`` is False for a directory without a header: never opened, ``error`` says
    what it is instead, and its stamp is the directory's own (its files are not stat'ed).
    """

    name: str
    path: Path
    stamp: Stamp
    dataset: Dataset | None
    error: str | None
    pack: bool = True

    def describe(self) -> dict[str, Any]:
        if self.dataset is None:
            return {"name": self.name, "available": False, "error": self.error}
        d = self.dataset
        return {
            "name": self.name,
            "available": True,
            "count": d.count,
            "fingerprint": d.fingerprint,
            "reads": d.reads,
        }


def check_root(given: Path) -> None:
    """Refuse a root that is missing, a file, or a pack itself (the user meant its parent)."""
    if not given.exists():
        raise ConfigError(
            f"--data {given} does not exist: pass the folder that holds your packs "
            "(each made with `batchd pack SOURCE OUT`)"
        )
    if not given.is_dir():
        raise ConfigError(
            f"--data {given} is a file, not a directory: pass the folder that holds your packs"
        )
    if (given / HEADER_NAME).is_file():
        path = given.resolve()
        raise ConfigError(
            f"--data {given} is a batchd pack, not a folder of packs: pass its parent "
            f"folder, --data {path.parent}, to serve it as {path.name!r}"
        )


class Registry:
    """Name -> open dataset, for every pack directory directly under the roots.

    With several roots, a name found in an earlier root hides the same name later.
    """

    def __init__(self, *roots: str | Path, rescan_interval: float = 0.25) -> None:
        if not roots:
            raise TypeError("Registry needs at least one root folder")
        for r in roots:
            check_root(Path(r))
        self.roots = tuple(Path(r).resolve() for r in roots)
        self.root = self.roots[0]
        self.rescan_interval = rescan_interval
        self._lock = threading.RLock()
        self._entries: dict[str, Entry] = {}
        self._last_scan = -float("inf")
        self.rescan(force=True)

    # --- scanning -------------------------------------------------------------

    def rescan(self, *, force: bool = False) -> None:
        """Pick up added, removed and replaced packs (at most once per interval)."""
        with self._lock:
            now = time.monotonic()
            if not force and now - self._last_scan < self.rescan_interval:
                return
            self._last_scan = now
            seen: dict[str, Entry] = {}
            children: list[Path] = []
            for root in self.roots:
                try:
                    children.extend(sorted(root.iterdir()))
                except OSError as exc:
                    log.error("cannot list %s: %s", root, exc)
                    return
            others: list[Path] = []
            for child in children:
                if child.name in seen or child.name.startswith(".") or child.name in _NOT_LISTED:
                    continue  # hidden (a pack being written) or made by the filesystem
                if not (child / HEADER_NAME).is_file():
                    others.append(child)
                    continue
                old = self._entries.get(child.name)
                try:
                    stamp = _stamp(child)
                except OSError:
                    continue  # vanished mid-scan
                seen[child.name] = (
                    old
                    if old is not None and old.pack and old.stamp == stamp
                    else self._open(child, stamp)
                )
            # Folders that are not packs come second: a pack of the same name in a later
            # root (the demo) is served rather than hidden by them.
            for child in others:
                if child.name in seen or not child.is_dir():
                    continue  # a plain file
                old = self._entries.get(child.name)
                try:
                    stamp = _dir_stamp(child)
                except OSError:
                    continue
                seen[child.name] = (
                    old
                    if old is not None and not old.pack and old.stamp == stamp
                    else self._not_a_pack(child, stamp)
                )
            self._entries = seen

    @staticmethod
    def _not_a_pack(path: Path, stamp: Stamp) -> Entry:
        return Entry(
            name=path.name,
            path=path,
            stamp=stamp,
            dataset=None,
            error=_why_not_a_pack(path),
            pack=False,
        )

    def _open(self, path: Path, stamp: Stamp) -> Entry:
        escape = _escapes(path)
        if escape is not None:
            log.warning("not serving %s: %s", path, escape)
            return Entry(name=path.name, path=path, stamp=stamp, dataset=None, error=escape)
        try:
            ds = open_dataset(path)
        except FormatError as exc:
            log.warning("not serving %s: %s", path, exc)
            # Clients see the file's name within the pack, not the server's paths.
            where = exc.path.relative_to(path) if exc.path.is_relative_to(path) else exc.path.name
            return Entry(
                name=path.name,
                path=path,
                stamp=stamp,
                dataset=None,
                error=f"{where}: {exc.problem}",
            )
        except (OSError, ValueError) as exc:
            log.warning("not serving %s: %s", path, exc)
            return Entry(name=path.name, path=path, stamp=stamp, dataset=None, error=str(exc))
        log.info(
            "serving %s: %d samples, fingerprint %s, reads %s",
            path.name,
            ds.count,
            ds.fingerprint,
            ds.reads,
        )
        return Entry(name=path.name, path=path, stamp=stamp, dataset=ds, error=None)

    # --- lookups --------------------------------------------------------------

    def entries(self) -> list[Entry]:
        """Every directory under the roots, available or not, packs or not (rescans first)."""
        self.rescan()
        with self._lock:
            return list(self._entries.values())

    def datasets(self) -> list[Dataset]:
        """The open datasets, without rescanning (for metrics)."""
        with self._lock:
            return [e.dataset for e in self._entries.values() if e.dataset is not None]

    def get(self, name: str) -> Dataset:
        """The current dataset called ``name``; re-opened first if it changed on disk.

        Raises :class:`~batchd_server.errors.InvalidName` for a name that is not a plain
        directory name, ``UnknownDataset`` or ``DatasetUnavailable`` (listing the served
        ones). A folder that is not a pack is ``DatasetUnavailable``, as the list shows it.
        """
        check_name(name)
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or not entry.pack:
                # Not there at the last scan, or not a pack then: it may be one by now.
                known = entry is not None
                entry = self._find(name)
                if entry is None and known:
                    self._entries.pop(name, None)
                    raise UnknownDataset(
                        f"dataset {name!r} was removed from the server's data folder"
                    )
            if entry is None:
                served = sorted(n for n, e in self._entries.items() if e.dataset is not None)
                raise UnknownDataset(
                    f"no dataset {name!r} on this server; served: {served}",
                )
            try:
                stamp = _stamp(entry.path) if entry.pack else entry.stamp
            except OSError:
                self._entries.pop(name, None)
                raise UnknownDataset(
                    f"dataset {name!r} was removed from the server's data folder",
                ) from None
            if entry.pack and stamp != entry.stamp:
                entry = self._open(entry.path, stamp)
                self._entries[name] = entry
            if entry.dataset is None:
                raise DatasetUnavailable(f"dataset {name!r} cannot be served: {entry.error}")
            return entry.dataset

    def current(self, name: str) -> Dataset | None:
        """``get(name)`` when that is quick, else None: the pack is open and unchanged on
        disk (one scan of its folder), and no other thread holds the registry."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            entry = self._entries.get(name)
            if entry is None or not entry.pack or entry.dataset is None:
                return None
            try:
                return entry.dataset if _stamp(entry.path) == entry.stamp else None
            except OSError:
                return None
        finally:
            self._lock.release()

    def close(self) -> None:
        """Close every open dataset (at shutdown; batches still computing would fail)."""
        with self._lock:
            for entry in self._entries.values():
                if entry.dataset is not None:
                    entry.dataset.close()
            self._entries = {}

    def _find(self, name: str) -> Entry | None:
        """Look ``name`` up on disk, as a scan would (``name`` is already a plain name).

        A pack in any root first, then a folder that is not one; the entry found
        replaces the table's.
        """
        for root in self.roots:
            path = root / name
            if (path / HEADER_NAME).is_file():
                try:
                    entry = self._open(path, _stamp(path))
                except OSError:
                    return None
                self._entries[name] = entry
                return entry
        if name in _NOT_LISTED:
            return None
        for root in self.roots:
            path = root / name
            if path.is_dir():
                try:
                    entry = self._not_a_pack(path, _dir_stamp(path))
                except OSError:
                    return None
                self._entries[name] = entry
                return entry
        return None

    def invalidate(self, name: str) -> None:
        """Forget ``name``'s stamp so the next lookup re-opens it (after a FormatError)."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None:
                self._entries[name] = Entry(
                    name=entry.name,
                    path=entry.path,
                    stamp=(),
                    dataset=None,
                    error=entry.error,
                    pack=entry.pack,
                )
