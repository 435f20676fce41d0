"""The client: epochs of batches from a batchd server, fetched ahead, checked, resumable.

A batch is a pure function of the request (dataset fingerprint, split, split seed,
seed, epoch, shuffle, batch size, drop_last, rank, world size, pipeline, index), so
the client keeps no server-side session: it asks for batch ``k`` of epoch ``e`` and
gets the same bytes from any replica, before or after a restart. What it does keep
is the trainer's position (epoch, next batch) for :meth:`Client.state_dict`.

Arrays in a yielded batch view the response buffer (no copy). They are writable, and
every batch has a buffer of its own: nothing the client does later overwrites a batch
the caller still holds (a buffer is recycled only once no array views it).
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import urllib.parse
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from numpy.typing import NDArray

from ._exceptions import FingerprintError, StateError, TransportError, WireError
from ._info import DatasetInfo, parse_info
from ._params import Params, augment_json, split_params, urls_of
from ._prefetch import WaitMeter, prefetched
from ._transport import Cancel, Transport
from .wire import CLIENT_HEADER, MAX_SEED, WAIT_HEADER, check_int, decode_batch

if TYPE_CHECKING:
    from ._keras import KerasDataset
    from ._torch import TorchDataset

__all__ = ["Client", "datasets"]

Batch = dict[str, NDArray[Any]]

_STATE_FORMAT = "batchd.Client/1"
_DEFAULT_RETRY_DEADLINE = 120.0


class Client:
    """Batches of one dataset on one or more equivalent batchd servers.

    ``urls``: ``"http://host:port"``, ``"unix:///path/to.sock"`` or a list of them
    (requests spread over the list; one that fails is skipped for a while).
    ``rank``/``world_size`` default to 0 and 1; :meth:`torch` takes them from
    ``torch.distributed`` when it is initialised and they were not given. ``token``
    defaults to the ``BATCHD_TOKEN`` environment variable. ``timeout`` bounds each
    connect and each socket read; failures are retried until ``retry_deadline``
    seconds have passed (long enough to ride out a server restart). ``transport``
    replaces the HTTP transport, for tests (:class:`batchd.testing.MockTransport`).

    ``split`` serves part of the pack: ``"[:80%]"``, ``"[80%:]"``, ``"[:1000]"``,
    ``"[:20%]+[40%:]"`` (tfds / Hugging Face slice syntax) over a fixed split order, a
    permutation of the pack from ``split_seed`` alone, so ``[:80%]`` and ``[80%:]``
    are disjoint, cover the pack and are class-mixed. ``stratify="label"`` (an integer
    field) cuts every class in the same proportion. Everything else (epochs, ranks,
    augmentation per sample id, ``index``, resume) works within the split as on the
    whole pack; :func:`batchd.kfold` gives the two splits of a fold.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        dataset: str,
        *,
        batch_size: int = 256,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        augment: Sequence[Mapping[str, Any]] | None = None,
        split: str | None = None,
        split_seed: int = 0,
        stratify: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        token: str | None = None,
        prefetch: int = 4,
        timeout: float = 60.0,
        retry_deadline: float = _DEFAULT_RETRY_DEADLINE,
        transport: Transport | None = None,
    ) -> None:
        if not isinstance(dataset, str) or not dataset:
            raise ValueError(f"dataset must be a non-empty name, got {dataset!r}")
        ws = 1 if world_size is None else check_int("world_size", world_size, 1)
        rk = 0 if rank is None else check_int("rank", rank, 0, ws - 1)
        if not (isinstance(timeout, int | float) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if not (isinstance(retry_deadline, int | float) and retry_deadline >= 0):
            raise ValueError(f"retry_deadline must be >= 0 seconds, got {retry_deadline!r}")
        split, split_seed, stratify = split_params(split, split_seed, stratify)
        self.urls = urls_of(urls)
        self._params = Params(
            dataset=dataset,
            batch_size=check_int("batch_size", batch_size, 1),
            seed=check_int("seed", seed, 0, MAX_SEED),
            shuffle=bool(shuffle),
            drop_last=bool(drop_last),
            augment=augment_json(augment),
            rank=rk,
            world_size=ws,
            split=split,
            split_seed=split_seed,
            stratify=stratify,
        )
        self._shard_given = rank is not None or world_size is not None
        self._token = token if token is not None else os.environ.get("BATCHD_TOKEN") or None
        self.prefetch = check_int("prefetch", prefetch, 1)
        self.timeout = float(timeout)
        self.retry_deadline = float(retry_deadline)
        self._epoch = 0
        self._next = 0
        self._resume_fingerprint: str | None = None
        self._given_transport = transport
        self._init_runtime()

    # -- plumbing -------------------------------------------------------------------

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        # Who this trainer is and how long it has waited for batches, sent with each
        # request so the server's status can show sharing and data stall (issue 17).
        self._tag = secrets.token_hex(4)
        self._waited = WaitMeter()
        self._tx: Transport | None = None
        self._tx_pid = -1
        self._info: DatasetInfo | None = None

    def __getstate__(self) -> dict[str, Any]:
        # No sockets, threads or locks: a DataLoader worker reconnects lazily.
        state = dict(self.__dict__)
        for key in ("_lock", "_tx", "_tx_pid", "_info", "_tag", "_waited"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def _transport(self) -> Transport:
        if self._given_transport is not None:
            return self._given_transport
        with self._lock:
            if self._tx is None or self._tx_pid != os.getpid():
                # A forked child must not share the parent's sockets.
                self._tx = Transport(
                    self.urls,
                    token=self._token,
                    timeout=self.timeout,
                    retry_deadline=self.retry_deadline,
                    keep_buffers=self.prefetch * 2 + 2,
                )
                self._tx_pid = os.getpid()
            return self._tx

    def close(self) -> None:
        """Close idle connections and drop recycled buffers (the client stays usable)."""
        with self._lock:
            tx, self._tx = self._tx, None
        if tx is not None:
            tx.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        p = self._params
        return (
            f"Client({list(self.urls)!r}, {p.dataset!r}, batch_size={p.batch_size}, seed={p.seed}, "
            f"shuffle={p.shuffle}, drop_last={p.drop_last}, rank={p.rank}, "
            f"world_size={p.world_size}"
            + (
                ""
                if p.split is None
                else f", split={p.split!r}, split_seed={p.split_seed}, stratify={p.stratify!r}"
            )
            + ")"
        )

    # -- dataset --------------------------------------------------------------------

    @property
    def dataset(self) -> str:
        return self._params.dataset

    @property
    def rank(self) -> int:
        return self._params.rank

    @property
    def world_size(self) -> int:
        return self._params.world_size

    @property
    def epoch(self) -> int:
        """The epoch :meth:`iterate` resumes by default (advanced when an epoch ends)."""
        return self._epoch

    @property
    def next_batch(self) -> int:
        """The batch :meth:`iterate` resumes from by default."""
        return self._next

    @property
    def shard_given(self) -> bool:
        """True when ``rank`` or ``world_size`` was passed (``torch()`` then keeps them)."""
        return self._shard_given

    def seek(self, epoch: int, next_batch: int = 0) -> None:
        """Move the position :meth:`iterate` and :meth:`state_dict` use."""
        self._epoch = check_int("epoch", epoch, 0, MAX_SEED)
        self._next = check_int("next_batch", next_batch, 0)

    def refresh(self) -> DatasetInfo:
        """Ask the server again for the dataset's info and this rank's epoch plan."""
        path = f"/v1/datasets/{urllib.parse.quote(self.dataset, safe='')}"
        resp = self._transport().get(path, self._params.plan_query())
        info = parse_info(self.dataset, resp.json(), resp.url)
        self._info = info
        return info

    @property
    def info(self) -> DatasetInfo:
        """Dataset count, fields, classes, fingerprint and epoch plan (fetched once)."""
        return self._info if self._info is not None else self.refresh()

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return self.info.batches

    # -- batches --------------------------------------------------------------------

    def fetch(
        self,
        epoch: int,
        k: int,
        *,
        info: DatasetInfo | None = None,
        cancel: Cancel | None = None,
    ) -> Batch:
        """Batch ``k`` of ``epoch`` as ``{field: array, "index": ids}`` (random access).

        ``info``: the dataset info the batch must match (default: :attr:`info`); a batch
        with another fingerprint raises :class:`FingerprintError`. ``cancel`` lets a
        prefetcher abort the request from another thread. The position is unchanged.
        """
        expect = info if info is not None else self.info
        path = f"/v1/datasets/{urllib.parse.quote(self.dataset, safe='')}/batches/{k}"
        marks = {
            CLIENT_HEADER: f"{self._tag}.{os.getpid()}",  # forked workers are trainers apart
            WAIT_HEADER: f"{self._waited.total:.3f}",
        }
        resp = self._transport().get(
            path, self._params.batch_query(epoch), cancel=cancel, shm=True, headers=marks
        )
        batch = decode_batch(resp.body)
        if batch.fingerprint != expect.fingerprint:
            raise FingerprintError(
                f"dataset {self.dataset!r} changed on the server (fingerprint "
                f"{expect.fingerprint} -> {batch.fingerprint}) during epoch {epoch}: "
                "restart the epoch / re-create the client"
            )
        if (batch.dataset, batch.epoch, batch.batch) != (self.dataset, epoch, k):
            raise WireError(
                f"{resp.url}: asked for {self.dataset!r} epoch {epoch} batch {k}, got "
                f"{batch.dataset!r} epoch {batch.epoch} batch {batch.batch}"
            )
        out: Batch = dict(batch.fields)
        out["index"] = batch.index
        return out

    def batches(
        self, epoch: int, ks: Iterable[int], *, info: DatasetInfo | None = None
    ) -> Generator[Batch, None, None]:
        """Batches ``ks`` of ``epoch`` in that order, ``prefetch`` requests ahead.

        Closing the generator cancels what is in flight. The position is unchanged:
        :meth:`iterate` is the resumable walk; this is for adapters and samplers.
        """
        expect = info if info is not None else self.info
        return prefetched(
            ks,
            lambda k, c: self.fetch(epoch, k, info=expect, cancel=c),
            self.prefetch,
            self._waited,
        )

    def iterate(
        self, epoch: int | None = None, start: int | None = None, *, progress: bool = False
    ) -> Iterator[Batch]:
        """Yield batches ``start``..end of ``epoch`` in order as ``{field: array, "index": ids}``.

        With no ``epoch``, resume where :meth:`state_dict` / the last iteration left off.
        Requests run ``prefetch`` ahead; closing the iterator early cancels them.
        Raises :class:`FingerprintError` if the dataset changes on the server mid-epoch.
        """
        if epoch is None:
            epoch, default_start = self._epoch, self._next
        else:
            epoch, default_start = check_int("epoch", epoch, 0, MAX_SEED), 0
        first = default_start if start is None else check_int("start", start, 0)
        return self._iterate(epoch, first, progress)

    def _start(self, epoch: int, start: int) -> DatasetInfo:
        """The info every batch of ``epoch`` must match, once ``start`` is checked against it."""
        info = self.refresh()
        if start > info.batches:
            raise ValueError(f"start={start} is past the end of the epoch ({info.batches} batches)")
        resumed = self._resume_fingerprint
        if start > 0 and epoch == self._epoch and resumed and resumed != info.fingerprint:
            raise FingerprintError(
                f"dataset {self.dataset!r} changed on the server (fingerprint {resumed} -> "
                f"{info.fingerprint}) since the state was saved mid-epoch {epoch}: "
                "restart the epoch / re-create the client"
            )
        return info

    def _iterate(self, epoch: int, start: int, progress: bool) -> Iterator[Batch]:
        info = self._start(epoch, start)
        bar = _progress_bar(info, epoch, start) if progress else None
        batches = prefetched(
            range(start, info.batches),
            lambda k, c: self.fetch(epoch, k, info=info, cancel=c),
            self.prefetch,
            self._waited,
        )
        try:
            for k, batch in enumerate(batches, start):
                self._epoch, self._next = epoch, k + 1
                self._resume_fingerprint = info.fingerprint
                if bar is not None:
                    bar.update(1)
                yield batch
            self._epoch, self._next = epoch + 1, 0
        finally:
            batches.close()  # cancel and join the fetchers now, not at garbage collection
            if bar is not None:
                bar.close()

    def stream(self, epoch: int | None = None, start: int | None = None) -> Iterator[Batch]:
        """Batches forever: ``start``..end of ``epoch``, then every batch of ``epoch + 1``, ...

        For loops that count steps, not epochs. Each epoch comes in full and in order
        before the next begins; requests run ``prefetch`` ahead, across epoch
        boundaries too. After each batch the position (:attr:`epoch`,
        :attr:`next_batch`, :meth:`state_dict`) is the batch after it, so
        ``load_state_dict`` then ``stream()`` resumes at the exact next batch. With no
        ``epoch``, start at that position. Each epoch's plan and fingerprint are
        fetched when the stream reaches it, as :meth:`iterate` does; a dataset that
        changes mid-epoch raises :class:`FingerprintError`. Close it to stop.
        """
        if epoch is None:
            epoch, default_start = self._epoch, self._next
        else:
            epoch, default_start = check_int("epoch", epoch, 0, MAX_SEED), 0
        first = default_start if start is None else check_int("start", start, 0)
        return self._stream(epoch, first)

    def _stream(self, epoch: int, start: int) -> Iterator[Batch]:
        info = self._start(epoch, start)

        def todo() -> Iterator[tuple[int, int, DatasetInfo]]:
            e, k, plan = epoch, start, info
            while True:
                if k >= plan.batches:
                    e, k, plan = e + 1, 0, self.refresh()  # the next epoch's fingerprint
                    if plan.batches == 0:
                        raise ValueError(
                            f"dataset {self.dataset!r} has no batches in an epoch for this "
                            "client (drop_last with fewer samples than batch_size?): "
                            "nothing to stream"
                        )
                yield e, k, plan
                k += 1

        batches = prefetched(
            todo(),
            lambda t, c: (t, self.fetch(t[0], t[1], info=t[2], cancel=c)),
            self.prefetch,
            self._waited,
        )
        try:
            for (e, k, plan), batch in batches:
                last = k + 1 >= plan.batches
                self._epoch, self._next = (e + 1, 0) if last else (e, k + 1)
                self._resume_fingerprint = plan.fingerprint
                yield batch
        finally:
            batches.close()

    # -- resume ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Position and parameters, JSON-serialisable: save it with your checkpoint."""
        return {
            "format": _STATE_FORMAT,
            "params": asdict(self._params),
            "epoch": self._epoch,
            "next_batch": self._next,
            "fingerprint": self._resume_fingerprint,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`; the client's parameters must be the saved ones."""
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            raise StateError(
                f"not a batchd client state (expected format {_STATE_FORMAT!r}): "
                "pass what Client.state_dict() returned"
            )
        saved = state.get("params")
        mine = asdict(self._params)
        if isinstance(saved, Mapping):  # saved before splits existed: the whole pack
            saved = {"split": None, "split_seed": 0, "stratify": None, **saved}
        if not isinstance(saved, Mapping) or set(saved) != set(mine):
            raise StateError(f"state params {saved!r} do not have the keys {sorted(mine)}")
        diff = [f"{k}={saved[k]!r} (this client: {mine[k]!r})" for k in mine if saved[k] != mine[k]]
        if diff:
            raise StateError(
                "the state was saved by a client with other parameters: "
                + ", ".join(diff)
                + "; create the client with the saved parameters to resume"
            )
        try:
            epoch = check_int("epoch", state.get("epoch"), 0)
            nxt = check_int("next_batch", state.get("next_batch"), 0)
        except ValueError as exc:
            raise StateError(f"corrupt client state: {exc}") from exc
        fingerprint = state.get("fingerprint")
        if fingerprint is not None and not isinstance(fingerprint, str):
            raise StateError(f"corrupt client state: fingerprint {fingerprint!r}")
        self._epoch, self._next, self._resume_fingerprint = epoch, nxt, fingerprint

    # -- framework adapters -----------------------------------------------------------

    def _with_shard(self, rank: int, world_size: int) -> Client:
        p = self._params
        other = Client(
            self.urls,
            p.dataset,
            batch_size=p.batch_size,
            seed=p.seed,
            shuffle=p.shuffle,
            drop_last=p.drop_last,
            augment=json.loads(p.augment),
            split=p.split,
            split_seed=p.split_seed,
            stratify=p.stratify,
            rank=rank,
            world_size=world_size,
            token=self._token,
            prefetch=self.prefetch,
            timeout=self.timeout,
            retry_deadline=self.retry_deadline,
            transport=self._given_transport,
        )
        other.seek(self._epoch)
        return other

    def keras(
        self,
        x: str | Sequence[str],
        y: str | Sequence[str] | None = None,
        sample_weight: str | None = None,
        **kwargs: Any,
    ) -> KerasDataset:
        """A ``keras.utils.PyDataset`` over this client's epochs (imports keras now).

        ``x``/``y``: a field name or a tuple of names (multi-input/-output);
        ``kwargs`` (``workers``, ``use_multiprocessing``, ``max_queue_size``) are
        accepted as ``PyDataset`` takes them. While Keras trains, each step is the next
        batch of :meth:`stream`: with ``steps_per_epoch`` unset a Keras epoch is one
        batchd epoch; with ``steps_per_epoch=S`` it is the next ``S`` batches, epochs
        back to back, so nothing runs out and no batch is skipped or repeated.
        """
        try:
            from ._keras import KerasDataset
        except ImportError as exc:
            _explain_missing(exc, "keras")
            raise

        return KerasDataset(self, x=x, y=y, sample_weight=sample_weight, **kwargs)

    def torch(self, *, rank: int | None = None, world_size: int | None = None) -> TorchDataset:
        """A ``torch.utils.data.IterableDataset`` of ready batches (imports torch now).

        Use ``DataLoader(ds, batch_size=None, num_workers=W)``: worker ``w`` takes
        batches ``w, w+W, ...`` so the workers together yield the epoch once.
        ``ds.set_epoch(e)`` reaches the workers, persistent or not; without it each new
        pass over the DataLoader is the next epoch.
        """
        try:
            from ._torch import TorchDataset, resolve_shard
        except ImportError as exc:
            _explain_missing(exc, "torch")
            raise

        r, w = resolve_shard(self, rank, world_size)
        client = self if (r, w) == (self.rank, self.world_size) else self._with_shard(r, w)
        return TorchDataset(client)


def _explain_missing(exc: ImportError, adapter: str) -> None:
    """Raise an ImportError saying what to install when an adapter's framework (or Keras'
    backend) cannot be imported; return for any other import error (raised as it is)."""
    missing = (exc.name or "").partition(".")[0]
    if adapter == "torch" and missing == "torch":
        why = (
            "client.torch() needs PyTorch, which is not installed: install your build of "
            "torch first (e.g. pip install torch==2.13.0 for CPU), then pip install 'batchd[torch]'"
        )
    elif adapter == "keras" and missing == "keras":
        why = (
            "client.keras() needs Keras 3, which is not installed: pip install 'batchd[keras]' "
            "and set KERAS_BACKEND=torch (with torch installed) or install a backend"
        )
    elif adapter == "keras" and missing in ("tensorflow", "jax", "torch"):
        backend = os.environ.get("KERAS_BACKEND")
        why = (
            f"Keras cannot load its backend ({missing} is not installed"
            + (
                f"; KERAS_BACKEND={backend}"
                if backend
                else "; KERAS_BACKEND is unset, so Keras wants tensorflow"
            )
            + "): set KERAS_BACKEND=torch before keras is first imported (torch installed), "
            "or install the backend"
        )
    else:
        return
    raise ImportError(why, name=exc.name) from exc


def _progress_bar(info: DatasetInfo, epoch: int, start: int) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:
        raise ImportError("progress=True needs tqdm: pip install tqdm") from exc
    return tqdm(total=info.batches, initial=start, unit="batch", desc=f"{info.name} epoch {epoch}")


def _get_json(
    urls: str | Sequence[str], path: str, token: str | None, timeout: float, deadline: float
) -> tuple[Any, str]:
    """``GET path`` from any of ``urls`` as JSON, and the URL that answered."""
    tx = Transport(
        urls_of(urls),
        token=token if token is not None else os.environ.get("BATCHD_TOKEN") or None,
        timeout=timeout,
        retry_deadline=deadline,
    )
    try:
        resp = tx.get(path)
        return resp.json(), resp.url
    finally:
        tx.close()


def datasets(
    urls: str | Sequence[str],
    *,
    token: str | None = None,
    timeout: float = 60.0,
    retry_deadline: float = 10.0,
) -> list[str]:
    """Names of the datasets a server serves (``GET /v1/datasets``)."""
    payload, url = _get_json(urls, "/v1/datasets", token, timeout, retry_deadline)
    try:
        return [str(d["name"]) for d in payload["datasets"]]
    except (KeyError, TypeError) as exc:
        raise TransportError(
            f"{url}: /v1/datasets answered {payload!r:.200}, not a dataset list"
        ) from exc


def server_status(
    urls: str | Sequence[str],
    *,
    token: str | None = None,
    timeout: float = 10.0,
    retry_deadline: float = 5.0,
) -> dict[str, Any]:
    """What the server is doing (``GET /v1/status``): datasets, live jobs and load.

    The same document the status page at ``/`` and ``batchd top`` show; its fields are
    in docs/protocol.md.
    """
    payload, url = _get_json(urls, "/v1/status", token, timeout, retry_deadline)
    if not (isinstance(payload, dict) and {"datasets", "jobs", "server"} <= payload.keys()):
        raise TransportError(f"{url}: /v1/status answered {payload!r:.200}, not a status")
    return payload
