"""Check a set of shards (ours or img2dataset's): samples per shard, unreadable images, empty captions, damaged
tars, embeddings present, and whether the ``_stats.json`` counts agree with the tar contents."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

from alignclip.data import shards as shardlib
from alignclip.data import images


@dataclass
class ShardReport:
    shard: str
    samples: int = 0
    usable: int = 0
    corrupt_image: int = 0
    too_large_image: int = 0
    missing_image: int = 0
    empty_caption: int = 0
    undecodable_caption: int = 0  # not UTF-8: training skips it (it would train on U+FFFD characters)
    with_semantic: int = 0
    damaged: str = ""  # "", "truncated_shard", "unreadable_shard", "stalled_shard" or "empty_shard"
    stats_count: int | None = None  # what *_stats.json claims
    bad_keys: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (not self.damaged and self.usable == self.samples
                and (self.stats_count is None or self.stats_count == self.samples))


def validate_shard(shard: str, image_keys: Sequence[str] = ("jpg", "png", "jpeg", "webp"), text_key: str = "txt",
                   semantic_key: str = "sem.npy", max_bad_keys: int = 20,
                   max_image_pixels: int = images.DEFAULT_MAX_PIXELS) -> ShardReport:
    """What training would make of the shard: a sample is usable when the trainer's own field check
    (``pipeline.extract_fields``: an image, a UTF-8 caption that is not blank) and image decoding accept it. A tar
    without any sample is ``empty_shard``."""
    from alignclip.data.pipeline import ReaderSettings, extract_fields

    report = ShardReport(shard, stats_count=shardlib.stats_count(shard))
    settings = ReaderSettings(shards=[shard], seed=0, epoch=0, rank=0, world_size=1, num_readers=1, batch_size=1,
                              batches_per_epoch=0, start_batch=0, image_size=0, context_length=0,
                              image_keys=tuple(image_keys), text_key=text_key, semantic_key=semantic_key,
                              max_image_pixels=max_image_pixels)
    errors = shardlib.ShardErrors(quiet=True)
    for raw in shardlib.iter_raw_samples(shard, errors):
        report.samples += 1
        report.with_semantic += semantic_key in raw
        before = dict(errors.counts)
        sample = extract_fields(raw, settings, errors)
        problem = next((k for k, v in errors.counts.items() if v != before.get(k)), "")
        if sample is not None:
            try:
                images.check_decodable(sample.image, max_image_pixels)
            except images.DecodeError as err:
                problem = "too_large_image" if isinstance(err, images.ImageTooLarge) else "corrupt_image"
        if problem:
            setattr(report, problem, getattr(report, problem) + 1)
            if len(report.bad_keys) < max_bad_keys:
                report.bad_keys.append(f"{raw['__key__']} ({problem})")
        else:
            report.usable += 1
    for kind in ("truncated_shard", "unreadable_shard", "stalled_shard"):
        if errors.counts[kind]:
            report.damaged = kind
    if not report.samples and not report.damaged:
        report.damaged = "empty_shard"  # training reads nothing from it
    return report


def validate_shards(shards: Sequence[str], **kwargs) -> tuple[list[ShardReport], dict]:
    """Per-shard reports and totals."""
    reports = [validate_shard(s, **kwargs) for s in shards]
    totals = {name: sum(getattr(r, name) for r in reports)
              for name in ("samples", "usable", "corrupt_image", "too_large_image", "missing_image", "empty_caption",
                           "undecodable_caption", "with_semantic")}
    totals.update(shards=len(reports), damaged_shards=sum(bool(r.damaged) for r in reports),
                  stats_mismatch=sum(r.stats_count is not None and r.stats_count != r.samples for r in reports))
    return reports, totals


def report_dict(report: ShardReport) -> dict:
    return dict(asdict(report), ok=report.ok)
