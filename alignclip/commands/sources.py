"""The image-text-set flags that alignclip-gap, alignclip-eval and alignclip-distill share, and the one place that
turns them into the library's ``SourceOptions`` (the library takes no argparse objects)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from alignclip.embeddings import EmbeddingSet, SourceOptions
from alignclip.embeddings import resolve_source as resolve_with_options


def add_source_arguments(parser) -> None:
    """The data-source flags every tool shares (used with an exported model; a cache needs none)."""
    group = parser.add_argument_group("image-text set (when a source is an exported .safetensors model)")
    group.add_argument("--data", default="generated", help="'generated' (the built-in set) or a shard spec")
    group.add_argument("--split", default="val", choices=["val", "train"], help="split of the generated set")
    group.add_argument("--folder", default="", help="folder of images (with --captions) instead of shards")
    group.add_argument("--captions", default="", help="captions file: filename<TAB>caption per line")
    group.add_argument("--tasks", default="", help="tasks JSON (zero-shot classes/templates/labels, arithmetic)")
    group.add_argument("--classnames", default="", help="zero-shot from files: class names, one per line ...")
    group.add_argument("--templates", default="", help="... prompt templates, one per line ({c} = the class) ...")
    group.add_argument("--labels", default="", help="... and key<TAB>class name lines (keys as in the shards)")
    group.add_argument("--limit", type=int, default=0, help="encode at most this many samples (0: all)")
    group.add_argument("--batch-size", type=int, default=64)
    group.add_argument("--arithmetic-text", default="caption", choices=["caption", "word"],
                       help="arithmetic deltas from whole captions or from the swapped words alone")
    group.add_argument("--cache-dir", default="", help="save each encoded set here (<cache-dir>/<name>)")
    group.add_argument("--trust-checkpoint", action="store_true",
                       help="accept a training run or checkpoint directory as a source: it is exported first, which "
                            "UNPICKLES its DeepSpeed state (torch.load runs code stored in the file); pass it only "
                            "for checkpoints you wrote. Exported .safetensors and caches never unpickle")


def source_options(args: argparse.Namespace) -> SourceOptions:
    """The parsed flags of ``add_source_arguments`` (and ``--device`` where a command has one)."""
    return SourceOptions(**{f.name: getattr(args, f.name) for f in fields(SourceOptions) if hasattr(args, f.name)})


def resolve_source(source: str, args: argparse.Namespace, name: str = "", split: str | None = None) -> EmbeddingSet:
    """``alignclip.embeddings.resolve_source`` with a command's parsed flags."""
    return resolve_with_options(source, source_options(args), name, split)
