"""The encode pipeline: read -> render -> tokenize -> label, streamed batch by batch into a store.

    inputs --readers--> (sample_id, Record) batches --Encoder--> Encoded --> SampleStore (spill files)
                        <= BATCH records, ~BATCH_BYTES            render | encode | label

With one worker, three threads overlap: reading + rendering the next batch (Python), the Rust
tokenizer's `encode_batch` on the current one (multi-threaded, releases the GIL), and labelling the
previous one. With `--workers N`, N processes each run the whole chain on their batches (one
tokenizer thread each). Batches come back in input order either way, so output is deterministic.
"""

from __future__ import annotations

import contextlib
import gc
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np

from ..config import BuildConfig
from ..pack.packing import mode
from ..read import reader_for
from ..read.contamination import Benchmark
from ..tokenize import cache
from ..tokenize.arrow import as_numpy
from ..tokenize.encode import Encoded, Encoder
from ..tokenize.screen import Screen
from ..tokenizer import load_fast
from ..write.store import SampleStore

T = TypeVar("T")

# Records per tokenizer call, at most: measured on 10k chats (2 cores), offsets encodings cost less
# CPU in large batches, id-only ones (`Encoder.boundaries`) in small ones (-0.5 s of Rust CPU at 500).
BATCH = 2000
BATCH_IDS_ONLY = 500
FIRST_BATCH = 125  # the first batches are smaller (doubling up to the batch size): the tokenizer starts sooner
BATCH_BYTES = 16 << 20  # and at most about this much input text (JSON Lines sizes are known)


@dataclass
class FileTask:
    """One input file of a build, in input order: read and tokenized, or taken from its cache entry."""

    source: int  # its recipe source (index)
    path: Path
    entry: Any = None  # its sealed cache entry (a table: `cache.replay`), None: tokenize the file
    key: str | None = None  # its cache key, None: not cached (parts, --no-cache, --truncation-unit turns...)
    first: int = 0  # its first sample id (set when reached)
    records: int = 0  # records it holds (counted when read, or the entry's)
    complete: bool = False  # read to its end
    again: int = 0  # records of its entry tokenized again (`cache.AGAIN`)


def file_tasks(config: BuildConfig, inputs: list[list[Path]], hashes: dict[str, str], tokenizer_hash: str,
               to: cache.Cache | None) -> list[FileTask]:
    """The build's input files, in order, each with its cache entry where the cache `to` holds one (`hashes`:
    each file's sha256). A part reads entries but writes none (it tokenizes only its share of a file)."""
    tasks = []
    for k, (source, paths) in enumerate(zip(config.recipe(), inputs)):
        settings = cache.settings_of(source) if to is not None else None
        for path in paths:
            key = cache.entry_key(hashes[str(path)], settings, tokenizer_hash) if settings is not None else None
            entry = to.open(key) if key is not None else None
            tasks.append(FileTask(k, path, entry, key if entry is not None or config.part is None else None,
                                  records=entry.num_rows if entry is not None else 0))
    return tasks


def _work(config: BuildConfig, tasks: list[FileTask], encoders: list[Encoder], counts: list[int],
          most: int = BATCH) -> Iterator[tuple[int, int, Any]]:
    """`(task, records, batch)` items in input order: a batch is `[(sample_id, Record), ...]` of one file, at
    most `most` records and about BATCH_BYTES of input (memory bounded by the settings whatever the record
    sizes), or an `Encoded` already made from the file's cache entry. Sample ids number the records of every
    file in order; `counts[k]` becomes the number of records source k holds (whole, or up to `num_samples` in
    all); --part I/N keeps the records whose id is I modulo N."""
    cap, part = config.read.num_samples or None, config.part
    sid, limit = 0, FIRST_BATCH
    for t_index, t in enumerate(tasks):
        if cap is not None and sid >= cap:
            break
        t.first = sid
        if t.entry is not None:
            n = t.records if cap is None else min(t.records, cap - sid)
            counts[t.source] += n

            def keep(s: np.ndarray, hi: int = sid + n) -> np.ndarray:
                return (s < hi) & (True if part is None else (s % part[1] == part[0]))
            for m, enc in _replayed(config, t, encoders[t.source], keep):
                yield t_index, m, enc
            sid += n
            t.complete = n == t.records
            continue
        batch, size = [], 0
        for record in reader_for(t.path, config.read)(t.path):
            if cap is not None and sid >= cap:
                break
            counts[t.source] += 1
            t.records += 1
            if part is None or sid % part[1] == part[0]:
                batch.append((sid, record))
                size += record.size
                if len(batch) >= limit or size >= BATCH_BYTES:
                    yield t_index, len(batch), batch
                    batch, size, limit = [], 0, min(2 * limit, most)
            sid += 1
        else:
            t.complete = True
        if batch:
            yield t_index, len(batch), batch


def _replayed(config: BuildConfig, t: FileTask, encoder: Encoder, keep) -> Iterator[tuple[int, Encoded]]:
    """A cached file's records as `(records, Encoded)`, in order: its samples truncated as this build says, its
    rejects as they were, and the records tokenized again (`cache.AGAIN`) tokenized here."""
    table = t.entry
    record = as_numpy(table.column("record"))
    again = np.flatnonzero((as_numpy(table.column("kind")) == cache.AGAIN) & keep(record + t.first))
    redone: dict[int, Encoded] = {}
    t.again = len(again)
    if len(again):
        wanted = set(record[again].tolist())
        found = [(t.first + i, r) for i, r in enumerate(reader_for(t.path, config.read)(t.path)) if i in wanted]
        for lo in range(0, len(found), BATCH):
            redone.update(encoder(found[lo:lo + BATCH]).by_sample())
    for kind, payload in cache.replay(table, t.first, str(t.path), keep):
        if kind == cache.SAMPLE:
            yield len(payload[0]), encoder.from_cache(*payload)
        elif kind == cache.REJECT:
            out = Encoded()
            encoder.reject(out, payload["sample_id"], payload["source"], payload["reason"], payload["message"])
            yield 1, out
        else:
            yield 1, redone[t.first + payload]


def encoders_for(config: BuildConfig, tok) -> list[Encoder]:
    """One encoder per source of the build (`BuildConfig.recipe`): each stage gets its own config section;
    samples are not truncated when the packing mode splits them (it cuts them into rows itself)."""
    return [Encoder(s.read, s.template, s.tokenize, tok, truncate=not mode(config.pack.mode).splits,
                    allow_code=config.allow_code) for s in config.recipe()]


def encoder_for(config: BuildConfig, tok) -> Encoder:
    """The encoder of a build of one source (`MemoryBuild`)."""
    return encoders_for(config, tok)[0]


_worker_encoders: list[Encoder] = []


def _init_worker(config: BuildConfig) -> None:
    _worker_encoders[:] = encoders_for(config, load_fast(config.tokenize.tokenizer))


def _run_worker(item: tuple[int, int, int, Any]) -> tuple[int, int, Encoded]:
    source, t_index, n, batch = item
    return t_index, n, batch if isinstance(batch, Encoded) else _worker_encoders[source](batch)


def encode_all(config: BuildConfig, tasks: list[FileTask], encoders: list[Encoder], store: SampleStore,
               progress: Callable[[int], None] | None = None, started: Callable[[], None] | None = None,
               cache_to: cache.Cache | None = None) -> tuple[int, list[int]]:
    """Encode every record of the input files (`tasks`, resolved once, by the caller) with their source's
    encoder into `store` (samples and rejects), files with a cache entry read from it; returns (records read,
    records per source: the whole input's, also in a part). Files tokenized whole are written to `cache_to` as they go
    (their `key` set). `started` is called once the first batch is stored (the next ones are in the tokenizer
    by then): work that must not delay the start begins there."""
    read, counts = 0, [0] * len(encoders)
    pool = None
    ids_only = all(e.boundaries is not None for e in encoders)
    work = _work(config, tasks, encoders, counts, BATCH_IDS_ONLY if ids_only else BATCH)
    if config.workers > 1:
        import multiprocessing as mp

        # one tokenizer thread per worker process (the environment is inherited at spawn)
        previous = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            pool = mp.get_context("spawn").Pool(config.workers, _init_worker, (config,))
        finally:
            if previous is None:
                del os.environ["TOKENIZERS_PARALLELISM"]
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = previous
        results: Iterable[tuple[int, int, Encoded]] = pool.imap(
            _run_worker, ((tasks[t].source, t, n, b) for t, n, b in work), 1)
    else:  # a pipeline: read + render | encode_batch (releases the GIL) | label, in three threads
        def coder(t: int) -> Encoder:
            return encoders[tasks[t].source]
        rendered = _prefetch((t, n, b if isinstance(b, Encoded) else coder(t).render(b)) for t, n, b in work)
        encoded = _prefetch((t, n, r, None if isinstance(r, Encoded) else coder(t).encode(r)) for t, n, r in rendered)
        results = ((t, n, r if isinstance(r, Encoded) else coder(t).label(r, encs)) for t, n, r, encs in encoded)
    entries = _Entries(tasks, cache_to, encoders[0].backend.get_vocab_size())
    screen = Screen(Benchmark(config.mix.decontaminate, config.mix.decontaminate_ngram, config.read),
                    encoders[0].backend) if config.mix.decontaminate else None
    try:
        for t, n, enc in results:
            entries.add(t, enc)  # the samples as tokenized: an entry never depends on the benchmark
            if screen is not None:
                enc = screen(enc)
            store.add(enc)
            if started is not None:  # the next batches are in the tokenizer and rendered ahead
                started()
                started = None
            read += n
            if progress:
                progress(n)
        entries.finish(len(tasks))
    finally:
        entries.discard()
        if pool is not None:
            pool.terminate()
    return read, counts


class _Entries:
    """The cache entries a build writes: one per file tokenized whole (its task has a `key`), filled batch by
    batch in input order, sealed once the build has moved past the file (discarded if it never read it all)."""

    def __init__(self, tasks: list[FileTask], to: cache.Cache | None, vocab_size: int) -> None:
        self.tasks, self.to, self.vocab_size = tasks, to, vocab_size
        self.open: dict[int, cache.EntryWriter | None] = {}  # None: the cache could not be written
        self.done = 0  # tasks before this one are finished

    def add(self, t: int, enc: Encoded) -> None:
        self.finish(t)
        task = self.tasks[t]
        if self.to is None or task.key is None or task.entry is not None:
            if task.entry is not None and self.to is not None:
                self.to.reused_tokens += int(enc.lengths.sum())
            return
        if t not in self.open:
            self.open[t] = self.to.writer(task.key, self.vocab_size, str(task.path))
        if self.open[t] is not None:
            self.open[t].add(enc, task.first)

    def finish(self, upto: int) -> None:
        """Seal (or discard) the entries of the tasks before `upto`, and count what came from the cache."""
        for t in range(self.done, upto):
            task, had = self.tasks[t], t in self.open
            writer = self.open.pop(t, None)
            if self.to is None:
                continue
            if task.entry is not None:
                self.to.reused.append(str(task.path))
                self.to.again += task.again
                continue
            if task.key is None:
                self.to.tokenized.append(str(task.path))
            elif task.complete:
                writer = writer if had else self.to.writer(task.key, self.vocab_size, str(task.path))
                if writer is not None:
                    writer.seal(task.records)
                self.to.tokenized.append(str(task.path))
            elif writer is not None:
                writer.discard()
        self.done = max(self.done, upto)

    def discard(self) -> None:
        for writer in self.open.values():
            if writer is not None:
                writer.discard()
        self.open.clear()


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for the block, and back as it was after (also on error)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def in_background(fn: Callable[..., T], *args: Any) -> Callable[[], T]:
    """Start `fn(*args)` in a thread; the returned function waits for its result (or raises its error)."""
    result: list = []

    def run() -> None:
        try:
            result.append((True, fn(*args)))
        except BaseException as e:  # handed to the caller
            result.append((False, e))

    thread = threading.Thread(target=run, daemon=True, name=f"sftprep-{getattr(fn, '__name__', 'task')}")
    thread.start()

    def wait() -> T:
        thread.join()
        ok, value = result[0]
        if not ok:
            raise value
        return value
    return wait


def _prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """Iterate `items` in a background thread, up to `depth` ahead; errors are re-raised here."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # handed to the consumer, which raises it
            q.put(e)

    thread = threading.Thread(target=produce, daemon=True, name="sftprep-read")
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
