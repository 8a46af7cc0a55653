"""Writing shards as img2dataset does (``KEY.jpg``, ``KEY.txt``, ``KEY.json`` [+ ``KEY.sem.npy``] in a tar, and a
``NNNNN_stats.json`` next to it), atomically: a shard appears under its final name only once it is complete, so an
interrupted writer leaves no half shard behind and a rerun can resume by skipping the shards that exist."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from alignclip.fs import atomic_write, replace_durably, temp_path


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class ShardWriter:
    """One tar shard. Use as a context manager; on an exception the partial file is removed.

    Members get fixed metadata (mtime 0, uid 0, mode 0644), so the same samples give byte-identical shards.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temp_path(self.path)
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def write(self, key: str, fields: dict[str, bytes | str | dict | np.ndarray]) -> None:
        """Add one sample: ``fields`` maps an extension (``jpg``, ``txt``, ``json``, ``sem.npy``) to its content."""
        for ext, value in fields.items():
            if isinstance(value, str):
                value = value.encode("utf-8")
            elif isinstance(value, dict):
                value = json.dumps(value, sort_keys=True).encode("utf-8")
            elif isinstance(value, np.ndarray):
                value = npy_bytes(value)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(value), 0, 0o644
            self._tar.addfile(info, io.BytesIO(value))
        self.count += 1

    def close(self) -> None:
        self._tar.close()
        replace_durably(self._tmp, self.path)
        write_stats(self.path, self.count)

    def abort(self) -> None:
        self._tar.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_stats(shard: str | Path, count: int, failed: int = 0) -> None:
    """img2dataset's per-shard ``NNNNN_stats.json`` (the fields the pipeline reads: ``successes``)."""
    shard = Path(shard)
    stats = {"count": count + failed, "successes": count, "failed_to_download": 0, "failed_to_resize": failed}
    atomic_write(shard.with_name(shard.stem + "_stats.json"), json.dumps(stats, indent=1))


def shard_name(index: int, prefix: str = "") -> str:
    return f"{prefix}{index:05d}.tar"


def sample_key(shard_index: int, index_in_shard: int, samples_per_shard: int) -> str:
    """img2dataset's key: the sample's global index, zero-padded (9 digits as it does)."""
    return f"{shard_index * samples_per_shard + index_in_shard:09d}"


# ---------------------------------------------------------------------------------- captions files (tools)
_IMAGE_COLUMNS = ("image", "filepath", "file", "path", "filename", "image_path", "img")
_CAPTION_COLUMNS = ("caption", "text", "txt", "title", "alt")


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
SOURCES_FILE = "sources.tsv"  # key<TAB>source file name of every sample, beside the shards make-shards wrote


def _pick(columns: Iterable[str], choices: tuple[str, ...], what: str, source: str) -> str:
    lowered = {c.lower().strip(): c for c in columns}
    for choice in choices:
        if choice in lowered:
            return lowered[choice]
    if any(c.lower().strip().endswith(_IMAGE_SUFFIXES) for c in lowered):
        raise ValueError(f"{source}: the first row {list(columns)} looks like data, not a header: add a header "
                         f"row (image,caption) or pass --no-header (first column the image, second the caption)")
    raise ValueError(f"{source}: no {what} column; expected one of {list(choices)}, found {list(lowered)}")


def _read_text(path: Path) -> str:
    """The file as UTF-8 text (a byte-order mark, as Excel writes, is dropped); a decode error names the line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: byte 0x{raw[err.start]:02x} is not UTF-8 ({err.reason}); "
                         f"save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def read_captions_file(path: str | Path, header: bool = True) -> list[tuple[str, str]]:
    """(image path, caption) pairs from a CSV, TSV (with a header row; ``header=False``: none, the first column is
    the image and the second the caption) or JSONL file; image paths as written."""
    path = Path(path)
    suffix = path.suffix.lower()
    text = _read_text(path)
    if suffix in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}, line {number}: not a JSON object ({err.msg})") from None
        if not rows:
            return []
        image_col = _pick(rows[0].keys(), _IMAGE_COLUMNS, "image", str(path))
        caption_col = _pick(rows[0].keys(), _CAPTION_COLUMNS, "caption", str(path))
        return [(str(r[image_col]), str(r.get(caption_col) or "")) for r in rows]
    delimiter = "\t" if suffix in (".tsv", ".tab") else ","
    if not header:
        pairs = []
        for number, row in enumerate(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter), 1):
            if not row or not any(field.strip() for field in row):
                continue
            if len(row) < 2:
                raise ValueError(f"{path}, line {number}: expected image{delimiter}caption, found {row!r}")
            pairs.append((row[0], row[1]))
        return pairs
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    image_col = _pick(reader.fieldnames or [], _IMAGE_COLUMNS, "image", str(path))
    caption_col = _pick(reader.fieldnames or [], _CAPTION_COLUMNS, "caption", str(path))
    return [(row[image_col], row[caption_col] or "") for row in reader]


def chunk_pairs(pairs: list, num_shards: int, samples_per_shard: int) -> Iterator[tuple[int, list]]:
    for shard in range(num_shards):
        chunk = pairs[shard * samples_per_shard:(shard + 1) * samples_per_shard]
        if chunk:
            yield shard, chunk


# ------------------------------------------------------------------------------- tools: resumable writing
_KEEP_AS_IS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
MANIFEST = "_make_shards.json"


def check_manifest(out_dir: str | Path, manifest: dict, overwrite: bool) -> bool:
    """Guard an output folder. Returns True when existing shards must be rewritten.

    No manifest and no shards: fresh. Same manifest: resume (keep finished shards). A different manifest, or shards
    without one: refuse, unless ``overwrite``.
    """
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    existing = sorted(out_dir.glob("*.tar")) if out_dir.is_dir() else []
    if overwrite:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(manifest, indent=1, sort_keys=True))
        return True
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous != manifest:
            changed = sorted(k for k in set(previous) | set(manifest) if previous.get(k) != manifest.get(k))
            raise FileExistsError(f"{out_dir} holds shards written with other settings (differing: {changed}); "
                                  f"pass --overwrite to replace them, or choose another output folder")
        return False
    if existing:
        raise FileExistsError(f"{out_dir} already holds {len(existing)} shard(s) not written by this tool; "
                              f"pass --overwrite to replace them")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(manifest, indent=1, sort_keys=True))
    return False


def _image_fields(path: Path, max_pixels: int) -> dict[str, bytes]:
    """The image as stored: JPEG/PNG/WebP bytes kept as they are (their header checked: a readable image within
    the pixel limit), other formats decoded (transparency on white, see ``images.load_rgb``) and saved as JPEG."""
    from alignclip.data import images

    ext = _KEEP_AS_IS.get(path.suffix.lower())
    data = path.read_bytes()
    if ext:
        images.image_size(data, max_pixels)
        return {ext: data}
    buf = io.BytesIO()
    images.load_rgb(data, max_pixels).save(buf, format="JPEG", quality=95)
    return {"jpg": buf.getvalue()}


@dataclass
class WriteSummary:
    written_shards: int = 0
    kept_shards: int = 0
    samples: int = 0
    failed: int = 0  # missing or unreadable images
    too_large: int = 0  # over the pixel limit


def write_folder_shards(pairs: list[tuple[str, str]], images_root: str | Path, out_dir: str | Path,
                        samples_per_shard: int, num_shards: int = 0, rewrite: bool = False,
                        log=print, max_pixels: int = 100_000_000) -> WriteSummary:
    """Shards of (image file, caption) pairs, ``samples_per_shard`` each (``num_shards`` = 0: as many as needed).
    A pair whose image cannot be read, or has more than ``max_pixels`` pixels, is counted, named in the log and
    left out. Finished shards are kept unless ``rewrite``."""
    from alignclip.data.images import ImageTooLarge

    images_root = Path(images_root)
    num_shards = num_shards or -(-len(pairs) // samples_per_shard)
    summary = WriteSummary()
    for shard, chunk in chunk_pairs(pairs, num_shards, samples_per_shard):
        path = Path(out_dir) / shard_name(shard)
        if path.exists() and not rewrite:
            summary.kept_shards += 1
            continue
        failed = too_large = 0
        with ShardWriter(path) as writer:
            for i, (image, caption) in enumerate(chunk):
                source = Path(image) if Path(image).is_absolute() else images_root / image
                try:
                    fields = _image_fields(source, max_pixels)
                except ImageTooLarge as err:
                    too_large += 1
                    log(f"  skipped (too large) {source}: {err}")
                    continue
                except Exception as err:  # missing or unreadable: img2dataset's "failed" count
                    failed += 1
                    log(f"  skipped {source}: {err}")
                    continue
                key = sample_key(shard, i, samples_per_shard)
                fields.update(txt=caption, json={"key": key, "caption": caption, "source": str(image),
                                                 "status": "success"})
                writer.write(key, fields)
        write_stats(path, writer.count, failed + too_large)
        summary.written_shards += 1
        summary.samples += writer.count
        summary.failed += failed
        summary.too_large += too_large
    write_sources(out_dir, pairs, num_shards, samples_per_shard)
    return summary


def write_sources(out_dir: str | Path, pairs: list[tuple[str, str]], num_shards: int, samples_per_shard: int) -> Path:
    """``sources.tsv``: each sample's key and the image name the captions file gave it (a skipped image's key has
    no sample), so files keyed by the source name (e.g. zero-shot labels) can be matched to the shards."""
    lines = ["key\tsource"]
    for shard, chunk in chunk_pairs(pairs, num_shards, samples_per_shard):
        lines += [f"{sample_key(shard, i, samples_per_shard)}\t{image}" for i, (image, _) in enumerate(chunk)]
    path = Path(out_dir) / SOURCES_FILE
    atomic_write(path, "\n".join(lines) + "\n")
    return path


def source_keys(spec: str) -> dict[str, str]:
    """source name -> sample key for shards written by ``write_folder_shards`` (empty for other shards): the name
    as the captions file wrote it, and its file name alone where that is unambiguous."""
    from alignclip.data.shards import expand_spec

    if spec == "generated" or not spec:
        return {}
    folders = {Path(shard).parent for shard in expand_spec(spec) if "://" not in shard}
    out: dict[str, str] = {}
    names: dict[str, list[str]] = {}
    for folder in sorted(folders):
        path = folder / SOURCES_FILE
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines()[1:]:
            key, _, source = line.partition("\t")
            out[source] = key
            names.setdefault(Path(source).name, []).append(key)
    for name, keys in names.items():
        if len(keys) == 1:
            out.setdefault(name, keys[0])
    return out
