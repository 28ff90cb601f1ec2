"""Shuffled training batches from a stream of activation chunks (rows of `diff`, one chunk per Parquet batch).

Activation shards are written document by document, so consecutive rows are strongly correlated. The caller
feeds chunks interleaved from many shards (`interleave`); `shuffled_batches` mixes them further with a shuffle
buffer of `buffer_rows` rows:

- the buffer fills with the first rows; from then on the rows of each incoming chunk take the slots of
  uniformly chosen distinct buffered rows, which are emitted in random order (a random-replacement buffer, like
  tf.data's `shuffle`); at the end of the stream the buffer is emitted in random order. Every row is emitted
  exactly once;
- memory: the buffer (in the chunks' dtype, e.g. float16), the current chunk and the rows it displaced, less
  than one batch of pending rows, and `prefetch` float32 batches;
- a background thread does the reading and shuffling and hands float32 batches over a bounded queue, so the
  trainer does not wait on I/O; an exception in the producer (e.g. a bad shard) is re-raised in the consumer;
  closing the consumer stops the producer.

    chunks = interleave([iter_shard(p) for p in shards], seed=0)          # Iterator[np.ndarray [n, D]]
    for x_BD in shuffled_batches(chunks, batch_size=2048, buffer_rows=65536, seed=0):
        trainer.step(x_BD)
"""

from __future__ import annotations

import queue
import random
import threading
from typing import Iterable, Iterator, TypeVar

import numpy as np
import torch

T = TypeVar("T")
_END = object()


class _ProducerError:
    def __init__(self, exc: BaseException):
        self.exc = exc


def interleave(iterators: Iterable[Iterable[T]], seed: int) -> Iterator[T]:
    """Round-robin over `iterators`, one item from each per round, in a new seeded random order every round.

    Exhausted iterators drop out; the others go on until all are done."""
    rng = random.Random(seed)
    active = [iter(it) for it in iterators]
    while active:
        order = list(range(len(active)))
        rng.shuffle(order)
        done: set[int] = set()
        for i in order:
            try:
                yield next(active[i])
            except StopIteration:
                done.add(i)
        active = [it for i, it in enumerate(active) if i not in done]


def shuffle_rows(
    chunks: Iterable[np.ndarray], batch_size: int, buffer_rows: int, seed: int, drop_last: bool = True
) -> Iterator[np.ndarray]:
    """The shuffle itself, in the calling thread: float32 [batch_size, D] arrays (see module docstring)."""
    if batch_size < 1 or buffer_rows < 1:
        raise ValueError(f"batch_size and buffer_rows must be >= 1, got {batch_size}, {buffer_rows}")
    rng = np.random.default_rng(seed)
    capacity = max(buffer_rows, batch_size)
    buf_RD: np.ndarray | None = None
    filled = 0
    pending_PD: np.ndarray | None = None  # emitted rows not yet in a batch (< batch_size)

    def emit(rows_MD: np.ndarray, final: bool = False) -> Iterator[np.ndarray]:
        nonlocal pending_PD
        if pending_PD is not None and len(pending_PD):
            rows_MD = np.concatenate([pending_PD, rows_MD])
        n_full = len(rows_MD) // batch_size * batch_size
        for start in range(0, n_full, batch_size):
            yield np.ascontiguousarray(rows_MD[start : start + batch_size], dtype=np.float32)
        pending_PD = rows_MD[n_full:]
        if final and len(pending_PD) and not drop_last:
            yield np.ascontiguousarray(pending_PD, dtype=np.float32)

    for n_chunk, chunk in enumerate(chunks):
        chunk_ND = np.asarray(chunk)
        if chunk_ND.ndim != 2:
            raise ValueError(f"chunk {n_chunk}: expected a 2-d array [rows, D], got shape {chunk_ND.shape}")
        if buf_RD is None:
            buf_RD = np.empty((capacity, chunk_ND.shape[1]), dtype=chunk_ND.dtype)
        elif chunk_ND.shape[1] != buf_RD.shape[1]:
            raise ValueError(f"chunk {n_chunk}: width {chunk_ND.shape[1]}, earlier chunks {buf_RD.shape[1]}")
        pos = min(capacity - filled, len(chunk_ND))
        buf_RD[filled : filled + pos] = chunk_ND[:pos]
        filled += pos
        while pos < len(chunk_ND):  # buffer full: incoming rows replace random buffered rows, which leave
            m = min(len(chunk_ND) - pos, capacity)
            slots_M = rng.choice(capacity, size=m, replace=False)  # random order
            out_MD = buf_RD[slots_M]
            buf_RD[slots_M] = chunk_ND[pos : pos + m]
            pos += m
            yield from emit(out_MD)
    if buf_RD is not None:
        yield from emit(buf_RD[:filled][rng.permutation(filled)], final=True)


def shuffled_batches(
    chunks: Iterable[np.ndarray],
    batch_size: int,
    buffer_rows: int,
    seed: int,
    prefetch: int = 2,
    drop_last: bool = True,
) -> Iterator[torch.Tensor]:
    """float32 tensors [batch_size, D] of shuffled rows of `chunks`, produced by a background thread.

    The last partial batch is yielded only with `drop_last=False`."""
    if batch_size < 1 or buffer_rows < 1 or prefetch < 1:
        raise ValueError(f"batch_size, buffer_rows, prefetch must be >= 1, got {batch_size}, {buffer_rows}, {prefetch}")
    rows = shuffle_rows(chunks, batch_size, buffer_rows, seed, drop_last)
    q: queue.Queue[object] = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch_BD in rows:
                if not put(torch.from_numpy(batch_BD)):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(_ProducerError(exc))

    return _consume(q, stop, threading.Thread(target=produce, name="diffsae-shuffle", daemon=True))


def _consume(q: queue.Queue[object], stop: threading.Event, thread: threading.Thread) -> Iterator[torch.Tensor]:
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _ProducerError):
                raise item.exc
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join(timeout=10)
