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
    with_semantic: int = 0
    damaged: str = ""  # "", "truncated_shard" or "unreadable_shard"
    stats_count: int | None = None  # what *_stats.json claims
    bad_keys: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (not self.damaged and self.usable == self.samples
                and (self.stats_count is None or self.stats_count == self.samples))


def validate_shard(shard: str, image_keys: Sequence[str] = ("jpg", "png", "jpeg", "webp"), text_key: str = "txt",
                   semantic_key: str = "sem.npy", max_bad_keys: int = 20) -> ShardReport:
    report = ShardReport(shard, stats_count=shardlib.stats_count(shard))
    errors = shardlib.ShardErrors()
    for raw in shardlib.iter_raw_samples(shard, errors):
        report.samples += 1
        report.with_semantic += semantic_key in raw
        image = next((raw[k] for k in image_keys if k in raw), None)
        problem = ""
        if image is None:
            report.missing_image += 1
            problem = "missing_image"
        else:
            try:
                images.check_decodable(image)
            except images.ImageTooLarge:
                report.too_large_image += 1
                problem = "too_large_image"
            except images.DecodeError:
                report.corrupt_image += 1
                problem = "corrupt_image"
        if not raw.get(text_key, b"").decode("utf-8", errors="replace").strip():
            report.empty_caption += 1
            problem = problem or "empty_caption"
        if problem:
            if len(report.bad_keys) < max_bad_keys:
                report.bad_keys.append(f"{raw['__key__']} ({problem})")
        else:
            report.usable += 1
    for kind in ("truncated_shard", "unreadable_shard"):
        if errors.counts[kind]:
            report.damaged = kind
    return report


def validate_shards(shards: Sequence[str], **kwargs) -> tuple[list[ShardReport], dict]:
    """Per-shard reports and totals."""
    reports = [validate_shard(s, **kwargs) for s in shards]
    totals = {name: sum(getattr(r, name) for r in reports)
              for name in ("samples", "usable", "corrupt_image", "too_large_image", "missing_image", "empty_caption", "with_semantic")}
    totals.update(shards=len(reports), damaged_shards=sum(bool(r.damaged) for r in reports),
                  stats_mismatch=sum(r.stats_count is not None and r.stats_count != r.samples for r in reports))
    return reports, totals


def report_dict(report: ShardReport) -> dict:
    return dict(asdict(report), ok=report.ok)
