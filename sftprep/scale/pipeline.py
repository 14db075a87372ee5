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
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from . import parts
from ..config import BuildConfig
from ..pack.packing import mode
from ..read import Record, reader_for
from ..read.contamination import Benchmark
from ..tokenize.encode import Encoded, Encoder
from ..tokenizer import load_fast
from ..write.store import SampleStore

T = TypeVar("T")

# Records per tokenizer call, at most: measured on 10k chats (2 cores), offsets encodings cost less
# CPU in large batches, id-only ones (`Encoder.boundaries`) in small ones (-0.5 s of Rust CPU at 500).
BATCH = 2000
BATCH_IDS_ONLY = 500
FIRST_BATCH = 125  # the first batches are smaller (doubling up to the batch size): the tokenizer starts sooner
BATCH_BYTES = 16 << 20  # and at most about this much input text (JSON Lines sizes are known)


def _batches(config: BuildConfig, inputs: list[list[Path]], counts: list[int], most: int = BATCH) -> Iterator:
    """(source, [(sample_id, Record), ...]) batches of at most `most` records and about BATCH_BYTES of input,
    so memory is bounded by the settings whatever the record sizes; a batch holds one source's records.
    `inputs` are each source's files; `counts[k]` becomes the number of records source k holds (read
    whole, or up to `num_samples` in all: what the sample ids are numbered by)."""
    def numbered() -> Iterator[tuple[int, tuple[int, Record]]]:
        stream = ((k, record) for k, paths in enumerate(inputs) for path in paths
                  for record in reader_for(path, config.read)(path))
        for sid, (k, record) in enumerate(islice(stream, config.read.num_samples or None)):
            counts[k] += 1
            yield sid, (k, record)

    records = parts.select(numbered(), config.part)  # --part I/N: every N-th record (all without it)
    batch, size, limit, current = [], 0, FIRST_BATCH, None
    for sid, (k, record) in records:
        if batch and (k != current or len(batch) >= limit or size >= BATCH_BYTES):
            yield current, batch
            batch, size, limit = [], 0, min(2 * limit, most)
        current = k
        batch.append((sid, record))
        size += record.size
    if batch:
        yield current, batch


def encoders_for(config: BuildConfig, tok) -> list[Encoder]:
    """One encoder per source of the build (`BuildConfig.recipe`): each stage gets its own config section;
    samples are not truncated when the packing mode splits them (it cuts them into rows itself)."""
    benchmark = Benchmark(config.mix.decontaminate, config.mix.decontaminate_ngram, config.read) \
        if config.mix.decontaminate else None
    return [Encoder(s.read, s.template, s.tokenize, tok, truncate=not mode(config.pack.mode).splits,
                    allow_code=config.allow_code, benchmark=benchmark) for s in config.recipe()]


def encoder_for(config: BuildConfig, tok) -> Encoder:
    """The encoder of a build of one source (`MemoryBuild`)."""
    return encoders_for(config, tok)[0]


_worker_encoders: list[Encoder] = []


def _init_worker(config: BuildConfig) -> None:
    _worker_encoders[:] = encoders_for(config, load_fast(config.tokenize.tokenizer))


def _run_worker(item: tuple[int, list]) -> tuple[int, Encoded]:
    k, batch = item
    return len(batch), _worker_encoders[k](batch)


def encode_all(config: BuildConfig, inputs: list[list[Path]], encoders: list[Encoder], store: SampleStore,
               progress: Callable[[int], None] | None = None,
               started: Callable[[], None] | None = None) -> tuple[list[dict[str, Any]], int, list[int]]:
    """Encode every record of each source's `inputs` (resolved once, by the caller) with its encoder into
    `store`; returns (rejects, records read, records per source: the whole input's, also in a part). `started` is called once
    the first batch is stored (the next ones are in the tokenizer by then): work that must not delay the start
    begins there."""
    rejects, read, counts = [], 0, [0] * len(inputs)
    pool = None
    ids_only = all(e.boundaries is not None for e in encoders)
    batches = _batches(config, inputs, counts, BATCH_IDS_ONLY if ids_only else BATCH)
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
        results: Iterable[tuple[int, Encoded]] = pool.imap(_run_worker, batches, 1)
    else:  # a pipeline: read + render | encode_batch (releases the GIL) | label, in three threads
        rendered = _prefetch((len(b), k, encoders[k].render(b)) for k, b in batches)
        encoded = _prefetch((n, k, r, encoders[k].encode(r)) for n, k, r in rendered)
        results = ((n, encoders[k].label(r, encs)) for n, k, r, encs in encoded)
    try:
        for n, enc in results:
            store.add(enc)
            if started is not None:  # the next batches are in the tokenizer and rendered ahead
                started()
                started = None
            rejects += enc.rejects
            read += n
            if progress:
                progress(n)
    finally:
        if pool is not None:
            pool.terminate()
    # in input order (a batch lists render rejects before label rejects), whatever the batches were,
    # so parts merged give the same rejects.jsonl as one build
    rejects.sort(key=lambda r: r["sample_id"])
    return rejects, read, counts


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
