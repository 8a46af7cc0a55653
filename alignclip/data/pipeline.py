"""The training input pipeline: shards -> samples with all fields -> shuffle -> decode + augment -> tokenise -> batches.

How an epoch is laid out (all of it a pure function of (data.train, train.seed, epoch, rank, world size)):

* **Length.** ``batches_per_epoch = samples_per_epoch // (per_rank_batch x world_size)`` (rounded down to whole
  optimiser steps when gradient accumulation is on), the same on every rank. ``samples_per_epoch`` is
  ``data.samples_per_epoch`` or, when 0, counted from the shards.
* **Readers.** Each rank runs ``R = max(data.workers, 1)`` readers. The rank's batch ``i`` comes from reader
  ``i mod R``, so reader ``r`` owns a quota of ``len(range(r, N, R))`` batches. PyTorch's DataLoader takes batches
  from its workers round-robin, in order, so the rank sees batches 0, 1, 2 ... in exactly this order.
* **Shards.** Plain lists: the list is permuted by (seed, epoch) and reader ``(rank, r)`` takes every
  ``(world x R)``-th shard of it, so one epoch reads every shard once across all readers. A reader whose shards run
  out before its quota wraps around: it reads its own shards again in a new order (counted as ``wrapped_passes``),
  so a few samples repeat; a reader with more samples than its quota leaves the rest for another epoch. With
  equally sized shards and ``samples_per_epoch`` a multiple of the global batch, each sample is seen exactly once.
  Resampled lists (``data.resampled``): each reader draws shards with replacement from the whole list, forever,
  with a generator seeded by (seed, epoch, reader).
* **Shuffle.** Raw (undecoded) samples pass a shuffle buffer of ``data.shuffle_buffer`` per reader; the buffer is
  drained at the end of each pass, so a pass never mixes with the next.
* **Batches.** Images travel as uint8 ``[b, 3, S, S]``; ``transforms.normalize_on_device`` applies CLIP's
  mean/std where the model runs. With ``data.decode: gpu`` JPEGs travel compressed with their crop boxes and
  ``device_decode.device_images`` decodes them there (the samples, crops and resume are the same).
* **Augmentation.** Every sample leaving the buffer consumes the same fixed number of uniforms from the
  reader's augmentation generator (seeded by (seed, epoch, reader)), valid or not, decoded or skipped; so the
  crops of a batch depend only on its position in the epoch.
* **Resume.** ``start_batch = k`` makes each reader skip its first batches by reading and checking samples
  without decoding them (JPEGs are entropy-decoded at 1/8 scale to tell a corrupt image, see
  ``images.check_decodable``): the batches that follow equal those of an uninterrupted epoch.
* **Errors.** A missing image, an empty or non-UTF-8 caption, a missing, wrong-width or non-finite precomputed
  embedding (checked as a shard is read, before the buffer), an undecodable or too large image (checked as it
  leaves the buffer), a truncated, unreadable, stalled or vanished shard are counted, logged with shard and key
  (first few per reader) and skipped. Each batch carries its reader's
  running counts; ``TrainLoader.stats()`` sums them over readers (``reduce_stats`` sums over ranks).
"""

from __future__ import annotations

import io
import itertools
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from alignclip.data import device_decode, images
from alignclip.data import shards as shardlib
from alignclip.data import transforms as T
from alignclip.data.sidecars import check_sidecars, read_sidecar, sidecar_path
from alignclip.distributed.layout import BatchLayout, batch_layout
from alignclip.distributed.process import ignore_preemption_signals, preemption_signals_blocked
from alignclip.errors import ConfigError

log = logging.getLogger(__name__)

_MAX_INVALID_IN_A_ROW = 100_000  # a reader that finds nothing usable in this many samples has no data at all
# torch's own RuntimeErrors for a worker that died (SIGKILL, OOM) and for DataLoader(timeout=...)
_LOADER_FAILURES = ("exited unexpectedly", "killed by signal", "DataLoader timed out")


class DataSourceError(RuntimeError):
    """The data source failed after training started: every reader exhausted by I/O errors (no shard yields a
    sample), a loader worker killed, a loader timeout. Outside the model: the trainer saves its last completed step
    and exits 124. The message's last line is the cause (a worker's error arrives wrapped in torch's traceback)."""

    @property
    def cause(self) -> str:
        lines = [line.strip() for line in str(self).splitlines() if line.strip()]
        return lines[-1].split("DataSourceError: ", 1)[-1] if lines else "data source failed"


@dataclass
class ReaderSettings:
    """Everything a reader needs; picklable, so a DataLoader worker rebuilds its state from it."""

    shards: list[str]
    seed: int
    epoch: int
    rank: int
    world_size: int
    num_readers: int
    batch_size: int
    batches_per_epoch: int
    start_batch: int
    image_size: int
    context_length: int
    resampled: bool = False
    shuffle_buffer: int = 1000
    image_keys: tuple[str, ...] = ("jpg", "png", "jpeg", "webp")
    text_key: str = "txt"
    semantic_key: str = "sem.npy"
    semantic_dir: str = ""
    with_semantic: bool = False
    semantic_dim: int = 0  # the embedding width every sample must have (0: not checked)
    max_image_pixels: int = images.DEFAULT_MAX_PIXELS
    decode: str = "cpu"  # where JPEGs are decoded: cpu (the workers) | gpu (the trainer's device, device_decode)
    io: shardlib.StreamPolicy = field(default_factory=shardlib.StreamPolicy)
    # Weighted sources (resampled only): each shard's source index and the sources' upsampling factors
    shard_sources: tuple[int, ...] = ()
    source_weights: tuple[float, ...] = ()


# ------------------------------------------------------------------------------------------- sample level
@dataclass
class _Sample:
    image: bytes
    caption: str
    key: str
    where: str  # shard:key, for messages
    semantic: Optional[np.ndarray] = None
    shard: str = ""


def image_skip_kind(err: images.DecodeError) -> str:
    return "too_large_image" if isinstance(err, images.ImageTooLarge) else "corrupt_image"


def _attach_sidecar(raw_samples: Iterator[dict], sidecar, text_key: str) -> Iterator[dict]:
    """Each sample with its row of ``sidecar`` (``semantic.Sidecar``), which must be the sample's: a key or caption
    the sidecar does not hold raises ``SidecarMismatch`` (it was made from another shard), never a skip."""
    for raw in raw_samples:
        if sidecar is not None:
            raw["__semantic__"] = sidecar.row(raw["__shard__"], raw["__key__"], raw.get(text_key, b""))
        yield raw


def extract_fields(raw: dict, settings: ReaderSettings, errors: shardlib.ShardErrors) -> Optional[_Sample]:
    """The image bytes, caption and embedding of a raw sample, or None (counted) when one is missing or empty."""
    where = f"{raw['__shard__']}:{raw['__key__']}"
    image = next((raw[k] for k in settings.image_keys if k in raw), None)
    if image is None:
        errors.add("missing_image", where)
        return None
    try:
        caption = raw.get(settings.text_key, b"").decode("utf-8").strip()
    except UnicodeDecodeError as err:  # would train on U+FFFD replacement characters
        errors.add("undecodable_caption", f"{where}: {settings.text_key} is not UTF-8 ({err})")
        return None
    if not caption:
        errors.add("empty_caption", where)
        return None
    semantic = None
    if settings.with_semantic:
        if "__semantic__" in raw:
            semantic = raw["__semantic__"]
        elif settings.semantic_key in raw:
            try:
                semantic = np.load(io.BytesIO(raw[settings.semantic_key]), allow_pickle=False)
            except (ValueError, OSError, EOFError) as err:
                errors.add("missing_semantic", f"{where}: unreadable {settings.semantic_key}: {err}")
                return None
        else:
            errors.add("missing_semantic", where)
            return None
        problem = semantic_problem(semantic, settings.semantic_dim)
        if problem:
            errors.add("bad_semantic", f"{where}: {settings.semantic_key} {problem}")
            return None
    return _Sample(image, caption, raw["__key__"], where, semantic, raw["__shard__"])


def semantic_problem(embedding: np.ndarray, dim: int) -> str:
    """Why a precomputed embedding cannot be used ("" when it can): not a vector of ``dim`` finite numbers."""
    if embedding.ndim != 1 or (dim and embedding.shape[0] != dim):
        return f"has shape {tuple(embedding.shape)}, expected ({dim},)"
    if not np.issubdtype(embedding.dtype, np.number) or not np.isfinite(embedding.astype(np.float32)).all():
        return "has non-finite values"
    return ""


def shuffled(stream: Iterator[dict], buffer_size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Reservoir-style shuffle: hold ``buffer_size`` samples, emit a random one as each new one arrives, then drain.
    A size of 1 (or less) keeps the order."""
    buffer_size = max(buffer_size, 1)
    buffer: list[dict] = []
    for item in stream:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        j = int(rng.integers(len(buffer)))
        buffer[j], item = item, buffer[j]
        yield item
    for j in rng.permutation(len(buffer)):
        yield buffer[j]


# ------------------------------------------------------------------------------------------- reader level
@dataclass
class _PassState:
    """Where a plain (not resampled) reader is in its passes over the shards."""

    pass_index: int = 0
    borrowing: bool = False
    failing: set = field(default_factory=set)


class ShardReader:
    """One reader's batches for one epoch: reader ``r`` of rank ``settings.rank``."""

    def __init__(self, settings: ReaderSettings, reader: int):
        self.s = settings
        self.reader = reader
        self.slot = shardlib.Slot(settings.rank, reader, settings.num_readers, settings.world_size)
        self.errors = shardlib.ShardErrors()
        base = [settings.seed, settings.epoch, self.slot.index]
        self._shuffle_rng = np.random.default_rng(base + [1])
        self._augment_rng = np.random.default_rng(base + [2])
        self._resample_rng = np.random.default_rng(base + [3])
        self.quota = len(range(reader, settings.batches_per_epoch, settings.num_readers))
        self.skip = len(range(reader, min(settings.start_batch, settings.batches_per_epoch), settings.num_readers))
        # Weighted sources: samples taken from each, as counters (data/source<i>_samples in TensorBoard)
        self._source_of = dict(zip(settings.shards, settings.shard_sources)) if settings.source_weights else {}
        for i in range(len(settings.source_weights)):
            self.errors.counts[f"source{i}_samples"] = 0

    def _pass_shards(self, pass_index: int) -> list[str]:
        mine = shardlib.slot_shards(self.s.shards, self.slot, self.s.seed, self.s.epoch)
        if pass_index == 0:
            return mine
        rng = np.random.default_rng([self.s.seed, self.s.epoch, self.slot.index, 4, pass_index])
        return [mine[i] for i in rng.permutation(len(mine))]

    def _borrowed_shards(self, pass_index: int) -> list[str]:
        rng = np.random.default_rng([self.s.seed, self.s.epoch, self.slot.index, 5, pass_index])
        return [self.s.shards[i] for i in rng.permutation(len(self.s.shards))]

    def _read_shard(self, shard: str) -> Iterator[dict]:
        sidecar = None
        if self.s.with_semantic and self.s.semantic_dir:
            sidecar = read_sidecar(self.s.semantic_dir, shard)  # missing or another shard's: SidecarMismatch
        for raw in _attach_sidecar(shardlib.iter_raw_samples(shard, self.errors, self.s.io), sidecar,
                                   self.s.text_key):
            self.errors.add("samples_read")
            yield raw

    def _usable(self, shard: str) -> Iterator[_Sample]:
        """A shard's samples that have every field (checked before the shuffle buffer, so it holds no dead ones)."""
        for raw in self._read_shard(shard):
            sample = extract_fields(raw, self.s, self.errors)
            if sample is not None:
                yield sample

    def samples(self) -> Iterator[_Sample]:
        """Shuffled undecoded samples, pass after pass (plain) or from an endless resampled shard stream."""
        if self.s.resampled:
            probs = None
            if self.s.source_weights:  # OpenCLIP's upsampling: a shard's weight is its source's factor
                weights = np.array([self.s.source_weights[i] for i in self.s.shard_sources], np.float64)
                probs = weights / weights.sum()

            def endless() -> Iterator[_Sample]:
                empty_draws = 0
                while True:
                    shard = self.s.shards[int(self._resample_rng.choice(len(self.s.shards), p=probs))
                                          if probs is not None else int(self._resample_rng.integers(len(self.s.shards)))]
                    empty_draws += 1
                    for sample in self._usable(shard):
                        empty_draws = 0
                        yield sample
                    if empty_draws > 10 * len(self.s.shards) + 100:  # drawn again and again, never a sample
                        raise DataSourceError(f"data: no usable sample in {empty_draws} resampled shards; "
                                              f"counts {self.errors.counts}")
            yield from shuffled(endless(), self.s.shuffle_buffer, self._shuffle_rng)
            return
        state = _PassState()
        while True:
            yield from shuffled(self._passes(state), self.s.shuffle_buffer, self._shuffle_rng)

    def _passes(self, state: "_PassState") -> Iterator[_Sample]:
        """Usable samples of the next pass, and of the ones after it while a pass ends on shards that gave nothing:
        the shuffle buffer drains only at a pass that ended on a good shard. ``state.failing`` holds the shards that
        gave nothing since one last did, across passes; once it holds every shard of the run, the source has failed
        (a storage outage): raised at once, so that every sample given so far is what the uninterrupted reader gave
        (before, an outage that began mid-pass skipped the pass's remaining shards, drained the buffer, and one that
        ended within the next pass filled the epoch with other data: a finished run, other weights, only a count)."""
        while True:
            if state.pass_index:
                self.errors.add("wrapped_passes")
            usable = 0
            shards = (self._borrowed_shards(state.pass_index) if state.borrowing
                      else self._pass_shards(state.pass_index))
            state.pass_index += 1
            for shard in shards:
                gave = False
                for sample in self._usable(shard):
                    if not gave:
                        gave = True
                        state.failing.clear()
                    usable += 1
                    yield sample
                if not gave:
                    state.failing.add(shard)
                    if len(state.failing) == len(set(self.s.shards)):
                        raise DataSourceError(f"data: rank {self.s.rank} reader {self.reader} found no usable "
                                              f"sample in any of the {len(state.failing)} shards, one after "
                                              f"another; counts {self.errors.counts}")
            if usable == 0 and not state.borrowing:
                # Its shards vanished or hold nothing usable: fill the quota from the whole list (in an order of
                # this reader's own), so the epoch keeps its length.
                state.borrowing = True
                log.warning("data: rank %d reader %d: no usable sample in its shards %s; reading from all %d "
                            "shards instead", self.s.rank, self.reader, self._pass_shards(0), len(self.s.shards))
            elif usable == 0:  # wrapping again would loop forever
                raise DataSourceError(f"data: rank {self.s.rank} reader {self.reader} found no usable sample in "
                                      f"any of the {len(self.s.shards)} shards; counts {self.errors.counts}")
            if not state.failing:
                return

    def __iter__(self) -> Iterator[dict]:
        from alignclip.tokenizer import get_tokenizer

        tokenizer = get_tokenizer(self.s.context_length)
        batch: list[tuple[_Sample, np.ndarray]] = []
        batches_done, skipped_valid, invalid_in_a_row = 0, 0, 0
        skip_samples = self.skip * self.s.batch_size
        if self.quota - self.skip <= 0:
            return
        for sample in self.samples():
            draws = T.crop_draws(self._augment_rng)  # drawn for every sample, decodable or not, skipped or not
            try:
                if skipped_valid < skip_samples:
                    images.check_decodable(sample.image, self.s.max_image_pixels)
                    skipped_valid += 1
                    invalid_in_a_row = 0
                    continue
                pixels = (device_decode.compressed_crop(sample.image, draws, self.s.max_image_pixels)
                          if self.s.decode == "gpu" else None)
                if pixels is None:
                    pixels = T.train_pixels(sample.image, self.s.image_size, draws, self.s.max_image_pixels)
            except images.DecodeError as err:
                self.errors.add(image_skip_kind(err), f"{sample.where}: {err}")
                invalid_in_a_row += 1
                if invalid_in_a_row > _MAX_INVALID_IN_A_ROW:
                    raise RuntimeError(f"data: {invalid_in_a_row} undecodable images in a row; counts "
                                       f"{self.errors.counts}") from err
                continue
            invalid_in_a_row = 0
            batch.append((sample, pixels))
            if self._source_of:
                self.errors.counts[f"source{self._source_of[sample.shard]}_samples"] += 1
            if len(batch) == self.s.batch_size:
                yield self._collate(batch, tokenizer)
                batch = []
                batches_done += 1
                if batches_done == self.quota - self.skip:
                    return

    def _collate(self, batch: list[tuple[_Sample, np.ndarray | torch.Tensor | device_decode.CompressedCrop]],
                 tokenizer) -> dict:
        samples = [s for s, _ in batch]
        captions = [s.caption for s in samples]
        pixels, shared = [p for _, p in batch], get_worker_info() is not None
        out = {
            **(device_decode.pack(pixels, self.s.image_size, shared) if self.s.decode == "gpu"
               else {"image": T.stack_uint8(pixels, shared)}),
            "text": tokenizer(captions),
            "caption": captions,
            "key": [s.key for s in samples],
            "_stats": dict(self.errors.counts, reader=self.reader),
        }
        if self.s.with_semantic:
            out["semantic"] = torch.from_numpy(np.stack([s.semantic for s in samples]).astype(np.float32))
        return out


class ShardBatches(IterableDataset):
    """The DataLoader-facing dataset: worker ``j`` plays reader ``(j + start_batch) mod R``, so that the round-robin
    order of the DataLoader, which always starts at worker 0, resumes at batch ``start_batch``."""

    def __init__(self, settings: ReaderSettings):
        super().__init__()
        self.settings = settings

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        s = self.settings
        if info is None:  # in-process: one reader
            yield from ShardReader(s, 0)
            return
        yield from ShardReader(s, (info.id + s.start_batch) % s.num_readers)


# ------------------------------------------------------------------------------------------- loader level
@dataclass
class EpochPlan:
    per_rank_batch: int
    batches_per_epoch: int
    samples_per_epoch: int
    accumulation_steps: int = 1
    samples_source: str = "data.samples_per_epoch"  # where the figure came from (logged; named when refused)


def plan_epoch(config, layout: BatchLayout, shards: list[str], spec: str = "") -> EpochPlan:
    """Per-rank batch size and the number of batches per epoch, identical on every rank (the batch split is
    ``layout``'s, written once in ``alignclip.distributed.layout``)."""

    per_rank, accumulation = layout.micro_batch, layout.accumulation
    data = config.data
    samples, source = ((data.samples_per_epoch, "data.samples_per_epoch") if data.samples_per_epoch
                       else epoch_count(data, spec, shards))
    batches = samples // (per_rank * layout.world_size) // accumulation * accumulation
    if batches == 0:
        raise ConfigError(f"{samples} samples per epoch (from {source}) is less than one global batch "
                          f"('train.global_batch_size' = {layout.global_batch}); set 'data.samples_per_epoch' "
                          f"or fix 'data.train'")
    return EpochPlan(per_rank, batches, samples, accumulation, source)


_COUNTS: dict[str, tuple[int, str]] = {}  # spec -> (samples, source): counted once per process


def epoch_samples(data_cfg, spec: str, shards: list[str]) -> int:
    return epoch_count(data_cfg, spec, shards)[0]


def epoch_count(data_cfg, spec: str, shards: list[str]) -> tuple[int, str]:
    """(samples per epoch, where the figure came from) when ``data.samples_per_epoch`` is 0: from the metadata
    beside the shards, a cached count, or by reading them; on rank 0 only when a process group is up (the figure is
    broadcast), once per process and spec (a folder that loses shards mid-run keeps its epoch length: the readers
    wrap to fill it). Logged with where the figure came from."""
    import torch.distributed as dist

    key = spec or "\n".join(shards)
    if key in _COUNTS:
        return _COUNTS[key]
    from alignclip.data.generated import dataset_dir

    policy = stream_policy(data_cfg)
    cache = dataset_dir(data_cfg).parent / "counts"  # data.cache_dir (the generated dataset's root)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        samples, source = shared_count(shards, policy, cache)
    else:
        samples, source = shardlib.count_samples(shards, policy, cache)
    log.info("data: %d samples per epoch in %d shards, from %s", samples, len(shards), source)
    _COUNTS[key] = samples, source
    return samples, source


def shared_count(shards: list[str], policy: shardlib.StreamPolicy, cache: Path) -> tuple[int, str]:
    """Rank 0 counts and broadcasts the figure; when its count ends otherwise (a preemption signal, an error), the
    other ranks hear so from the same broadcast and end the same way at once, instead of waiting in it until the
    collective timeout."""
    import torch.distributed as dist

    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box = [("counted", *shardlib.count_samples(shards, policy, cache))]
        except shardlib.Interrupted as err:
            box = [("interrupted", str(err))]
            raise
        except BaseException as err:
            box = [("config" if isinstance(err, ConfigError) else "failed", f"{type(err).__name__}: {err}")]
            raise
        finally:
            dist.broadcast_object_list(box, src=0)
    else:
        dist.broadcast_object_list(box, src=0)
    outcome = box[0]
    if outcome[0] == "interrupted":
        message = f"rank 0: {outcome[1]}"
        log.error("data: %s", message)
        raise shardlib.Interrupted(message)
    if outcome[0] == "config":
        raise ConfigError(f"rank 0: {outcome[1]}")
    if outcome[0] == "failed":
        raise RuntimeError(f"rank 0 failed while counting the samples of the training shards: {outcome[1]}")
    return outcome[1], outcome[2] + " (on rank 0)"


def stream_policy(data_cfg) -> shardlib.StreamPolicy:
    return shardlib.StreamPolicy(timeout_s=data_cfg.io_timeout_s, retries=data_cfg.io_retries)


def _probe_semantic(shards: list[str], data_cfg, optional: bool = False) -> bool:
    """Precomputed embeddings are used when a sidecar folder is configured or the first shard's first sample has
    one; every rank probes the same shard, so they agree. ``optional`` (evaluation): only when the first shard's
    sidecar exists, so a validation split without embeddings still gives images and captions."""
    if data_cfg.semantic_dir:
        if not optional:
            check_sidecars(data_cfg.semantic_dir, shards)  # every one present and made from its shard: exit 2
            return True
        if sidecar_path(data_cfg.semantic_dir, shards[0]).is_file():
            return True
    first = next(shardlib.iter_raw_samples(shards[0], policy=stream_policy(data_cfg)), None)
    return first is not None and data_cfg.semantic_key in first


def _probe_semantic_dim(shards: list[str], data_cfg) -> int:
    """The embedding width of the first shard's first sample with one (0: unknown, not checked)."""
    for raw in itertools.islice(shardlib.iter_raw_samples(shards[0], policy=stream_policy(data_cfg)), 64):
        if data_cfg.semantic_key in raw:
            try:
                vector = np.load(io.BytesIO(raw[data_cfg.semantic_key]), allow_pickle=False)
            except (ValueError, OSError, EOFError):
                continue
            return int(vector.shape[0]) if vector.ndim == 1 else 0
    return 0


def _split_keys(keys: str) -> tuple[str, ...]:
    return tuple(k.strip().lower() for k in keys.split(";") if k.strip())


def reader_settings(config, data: "TrainData", rank: int, world_size: int, epoch: int,
                    start_batch: int) -> ReaderSettings:
    cfg = config.data
    settings = ReaderSettings(
        shards=list(data.shards), seed=config.train.seed, epoch=epoch, rank=rank, world_size=world_size,
        num_readers=max(cfg.workers, 1), batch_size=data.epoch.per_rank_batch,
        batches_per_epoch=data.epoch.batches_per_epoch, start_batch=start_batch,
        image_size=config.model.vision.image_size, context_length=config.model.text.context_length,
        resampled=cfg.resampled, shuffle_buffer=cfg.shuffle_buffer, image_keys=_split_keys(cfg.image_key),
        text_key=cfg.text_key, semantic_key=cfg.semantic_key, semantic_dir=cfg.semantic_dir,
        with_semantic=data.with_semantic, max_image_pixels=cfg.max_image_pixels,
        semantic_dim=data.semantic_dim, io=stream_policy(cfg), decode=cfg.decode)
    if data.source_weights:
        settings.shard_sources, settings.source_weights = data.shard_sources, data.source_weights
    return settings


@dataclass(frozen=True)
class TrainData:
    """The training data, resolved once per run (the run plan holds it): the shard list, the epoch's length in
    batches, whether the samples carry precomputed caption embeddings and their width."""

    spec: str
    shards: tuple[str, ...]
    epoch: EpochPlan
    with_semantic: bool
    semantic_dim: int  # 0: not checked (a sidecar folder, or no embedding found in the first shard)
    shard_sources: tuple[int, ...] = ()  # the '::' source of each shard, with data.weights
    source_weights: tuple[float, ...] = ()


def plan_train_data(config, layout: BatchLayout, at_start: bool = True) -> TrainData:
    """Resolve ``data.train`` once: expand the spec, check it against the world, count the epoch, probe the
    caption embeddings. Config errors name the key. ``at_start``: too few shards for the readers is a config error
    at the start of a run; in a later epoch a folder that lost shards is not (readers without a shard read from the
    whole list)."""

    spec = resolve_spec(config.data, "train")
    try:
        sources = shardlib.expand_sources(spec)
    except FileNotFoundError as err:
        raise ConfigError(f"key 'data.train': {err}") from err
    shards = [shard for source in sources for shard in source]
    weights: list[float] = []
    if config.data.weights:
        if not config.data.resampled:
            raise ConfigError("key 'data.weights' mixes sources by resampling: set 'data.resampled=true' (and "
                              "'data.samples_per_epoch')")
        weights = shardlib.source_weights(config.data.weights, len(sources))
    if not config.data.resampled and at_start:
        shardlib.check_enough_shards(shards, layout.world_size, config.data.workers)
    epoch = plan_epoch(config, layout, shards, spec)
    data = config.data
    return TrainData(spec=spec, shards=tuple(shards), epoch=epoch, with_semantic=_probe_semantic(shards, data),
                     semantic_dim=0 if data.semantic_dir else _probe_semantic_dim(shards, data),
                     shard_sources=tuple(i for i, source in enumerate(sources) for _ in source) if weights else (),
                     source_weights=tuple(weights))


class TrainLoader:
    """An epoch of batches for one rank. ``len()`` is the full epoch's number of batches (equal on every rank);
    iterating yields batches ``start_batch .. len() - 1``. ``stats()`` gives the skip counters so far."""

    def __init__(self, settings: ReaderSettings, plan: EpochPlan, num_workers: int, pin_memory: bool = False,
                 prefetch_factor: int = 4, timeout_s: float = 0.0):
        self.settings = settings
        self.plan = plan
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.timeout_s = timeout_s if num_workers else 0.0  # DataLoader's timeout needs workers
        self._reader_stats: dict[int, dict[str, int]] = {}
        self.batches_yielded = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.plan.batches_per_epoch

    @property
    def start_batch(self) -> int:
        return self.settings.start_batch

    @property
    def has_semantic(self) -> bool:
        return self.settings.with_semantic

    def __len__(self) -> int:
        return self.plan.batches_per_epoch

    def __iter__(self) -> Iterator[dict]:
        dataset = ShardBatches(self.settings)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor if self.num_workers else None,
                            persistent_workers=False, worker_init_fn=ignore_preemption_signals,
                            timeout=self.timeout_s)
        with preemption_signals_blocked():  # the workers start here; each ignores the signals before unblocking
            batches = iter(loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except DataSourceError:
                raise
            except RuntimeError as err:
                if not any(text in str(err) for text in _LOADER_FAILURES):
                    raise
                raise DataSourceError(f"data: {str(err).splitlines()[0]}") from err
            except (ConnectionError, EOFError) as err:
                if not self.num_workers:  # the reading happens here: not a hand-over between processes
                    raise
                # a worker killed while it handed a batch over (its shared-memory file descriptor never came)
                raise DataSourceError(f"data: a loader worker died while handing over a batch "
                                      f"({type(err).__name__}: {err})") from err
            stats = batch.pop("_stats")
            self._reader_stats[stats.pop("reader")] = stats
            self.batches_yielded += 1
            yield batch

    def stats(self) -> dict[str, int]:
        """Counts summed over this rank's readers (as of the last batch each reader delivered)."""
        total = {name: 0 for name in shardlib.ShardErrors.FIELDS}
        for counts in self._reader_stats.values():
            for name, value in counts.items():
                total[name] = total.get(name, 0) + value
        total["batches"] = self.batches_yielded
        return total


def reduce_stats(stats: dict[str, int]) -> dict[str, int]:
    """Sum ``TrainLoader.stats()`` over ranks (a collective: call it on every rank)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(stats)
    names = sorted(stats)
    values = torch.tensor([stats[n] for n in names], dtype=torch.int64)
    dist.all_reduce(values)
    return dict(zip(names, values.tolist()))


# ------------------------------------------------------------------------------------------- entry points
def resolve_spec(data_cfg, split: str) -> str:
    """``data.train`` / ``data.val`` as a shard spec; "generated" is rendered under the cache dir if absent."""
    from alignclip.data import generated

    spec = data_cfg.train if split == "train" else data_cfg.val
    if split == "val" and not spec and data_cfg.train == "generated":
        spec = "generated"
    elif split == "val" and not spec and data_cfg.train:
        # No validation split named: the live gap metrics still need a fixed batch; take the training list's last
        # shard (seen in training too, so not held out: say so).
        spec = shardlib.expand_spec(data_cfg.train)[-1]
        log.warning("data: 'data.val' is empty; the eval batch comes from the last training shard %s", spec)
    if spec == "generated":
        return generated.ensure_generated(data_cfg).spec(split)
    if not spec:
        raise ConfigError(f"key 'data.{split}' is empty: name shards (a brace pattern, a folder, or 'generated')")
    return spec


def build_train_loader(config, rank: int, world_size: int, epoch: int, start_batch: int = 0,
                       data: Optional[TrainData] = None, pin_memory: Optional[bool] = None) -> TrainLoader:
    """The training batches of one epoch for ``rank`` (see the module docstring for the layout). ``data``: the
    run plan's ``TrainData`` (resolved here when not given). ``pin_memory``: the run plan's fast path decides it
    (``alignclip.training.fast_path``); not given, ``data.pin_memory`` as set (null: off)."""
    data = data or plan_train_data(config, batch_layout(config, world_size), at_start=epoch == 0)
    plan = data.epoch
    if not 0 <= start_batch <= plan.batches_per_epoch:
        raise ValueError(f"start_batch {start_batch} outside the epoch's 0..{plan.batches_per_epoch} batches")
    settings = reader_settings(config, data, rank, world_size, epoch, start_batch)
    pin = bool(config.data.pin_memory) if pin_memory is None else pin_memory
    return TrainLoader(settings, plan, num_workers=config.data.workers, pin_memory=pin,
                       prefetch_factor=config.data.prefetch_factor, timeout_s=config.data.loader_timeout_s)


def iter_eval_batches(config, batch_size: int, spec: str | None = None, limit: int = 0,
                      errors: shardlib.ShardErrors | None = None) -> Iterator[dict]:
    """Every usable sample of a shard spec (default: the validation split) once, in shard order, with the eval
    transform; in-process. ``limit`` > 0 stops after that many samples. ``errors`` receives the skip counts (what
    a report of the measured pairs states)."""
    from alignclip.tokenizer import get_tokenizer

    spec = spec or resolve_spec(config.data, "val")
    shards = shardlib.expand_spec(spec)
    data = config.data
    if data.semantic_dir and not set(shards) <= set(_listed_shards(data.train)):
        # The sidecars were made for the training shards: other data (a held-out set whose shards are named like
        # them, an exported model measured elsewhere) never reads them.
        data = replace(data, semantic_dir="")
    settings = ReaderSettings(shards=shards, seed=0, epoch=0, rank=0, world_size=1, num_readers=1,
                              batch_size=batch_size, batches_per_epoch=0, start_batch=0,
                              image_size=config.model.vision.image_size,
                              context_length=config.model.text.context_length,
                              image_keys=_split_keys(data.image_key), text_key=data.text_key,
                              semantic_key=data.semantic_key, semantic_dir=data.semantic_dir,
                              with_semantic=_probe_semantic(shards, data, optional=True),
                              max_image_pixels=data.max_image_pixels, io=stream_policy(data))
    reader = ShardReader(settings, 0)
    if errors is not None:
        reader.errors = errors
    tokenizer = get_tokenizer(settings.context_length)
    batch: list[tuple[_Sample, np.ndarray]] = []
    seen = 0
    for shard in shards:
        for sample in reader._usable(shard):
            try:
                pixels = T.eval_transform(images.load_rgb(sample.image, settings.max_image_pixels,
                                                          min_size=settings.image_size), settings.image_size)
            except images.DecodeError as err:
                reader.errors.add(image_skip_kind(err), f"{sample.where}: {err}")
                continue
            batch.append((sample, pixels))
            seen += 1
            if len(batch) == batch_size or (limit and seen == limit):
                yield _eval_batch(reader, batch, tokenizer)
                batch = []
            if limit and seen == limit:
                return
    if batch:
        yield _eval_batch(reader, batch, tokenizer)


def _listed_shards(spec: str) -> list[str]:
    try:
        return shardlib.expand_spec(spec) if spec and spec != "generated" else []
    except FileNotFoundError:
        return []


def _eval_batch(reader: ShardReader, batch: list, tokenizer) -> dict:
    """Evaluation batches are normalised on the host (float32): their users feed them to a model directly."""
    out = reader._collate(batch, tokenizer)
    out.pop("_stats")
    out["image"] = T.normalize_on_device(out["image"])
    return out


def build_eval_batch(config, n: int, spec: str | None = None) -> dict:
    """A fixed held-out batch (the first ``n`` usable validation samples, eval transform) for live gap metrics."""
    batch = next(iter_eval_batches(config, batch_size=n, spec=spec, limit=n), None)
    if batch is None:
        raise ValueError(f"no usable sample in the validation shards ({spec or config.data.val or 'generated'})")
    if len(batch["caption"]) < n:
        log.warning("data: eval batch has %d samples, fewer than the %d asked for", len(batch["caption"]), n)
    return batch
