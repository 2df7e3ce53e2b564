"""The pre-flight dataset report: what a run will train on, written before the first step.

`build_report(dataset, cfg, count_tokens)` reads a built TrainDataset (no pixels decoded) and the
resolved config: per subset the images, repeats and caption files; per bucket the samples, batches
and short batches; steps per epoch and in total; captions the text encoder would cut; images that
are upscaled to reach their bucket. `Report.text()` is a fixed-width table for the console,
`Report.as_dict()` the same numbers for `dataset_report.json`.

`debug_dataset(dataset)` is kohya's `--debug_dataset` as text: the samples of the first
batches of epoch 0, with their bucket and the caption as it is processed for that epoch.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Callable

from library.errors import UserError
from library.saving import atomic_write_text

DEFAULT_TOKEN_LIMIT = 75  # CLIP's 77 positions minus the start and end markers (kohya's default)
REPORT_STEM = "dataset_report"


def schedule_length(steps_per_epoch: int, max_train_steps: int | None, max_train_epochs: int | None) -> tuple[int, int]:
    """(total steps, epochs) by kohya's rule: --max_train_epochs wins over --max_train_steps, and the
    epochs are as many as it takes to cover the steps (the trainer's Run._schedule_length)."""
    max_steps = max_train_epochs * steps_per_epoch if max_train_epochs else max_train_steps
    if not max_steps or max_steps <= 0:
        raise UserError("--max_train_steps must be positive")
    return max_steps, math.ceil(max_steps / steps_per_epoch)


@dataclass
class SubsetRow:
    folder: str
    is_reg: bool
    images: int
    repeats: int
    samples: int  # per epoch: images x repeats, for regularisation images as balanced against train images
    caption_files: int
    missing_captions: int
    class_token: str  # the caption of each image without a caption file


@dataclass
class BucketRow:
    resolution: tuple[int, int]
    images: int  # unique images
    samples: int  # images x repeats: what one epoch trains on
    batches: int
    short_batches: int  # 0 or 1: the last batch of a bucket that train_batch_size does not divide
    samples_in_short_batches: int
    upscaled: int  # unique images smaller than the size they are resized to
    training_size: tuple[int, int] | None = None  # multi-resolution: the resolution the bucket belongs to


@dataclass
class Report:
    """The numbers of the pre-flight report; see the module doc."""

    subsets: list[SubsetRow]
    buckets: list[BucketRow]
    batch_size: int
    gradient_accumulation_steps: int
    batches_per_epoch: int
    steps_per_epoch: int
    epochs: int
    total_steps: int
    token_limit: int
    long_captions: list[dict] = field(default_factory=list)  # {"image", "tokens"}
    upscaled_images: list[dict] = field(default_factory=list)  # {"image", "size", "bucket"}

    def as_dict(self) -> dict:
        """The numbers of text(), in plain JSON types, plus the run totals of the short batches."""
        short = [b for b in self.buckets if b.short_batches]
        return {
            "subsets": [asdict(s) for s in self.subsets],
            "buckets": [_bucket_dict(b) for b in self.buckets],
            "batch_size": self.batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "batches_per_epoch": self.batches_per_epoch,
            "short_batches": len(short),
            "samples_in_short_batches": sum(b.samples_in_short_batches for b in short),
            "dropped_samples": 0,  # short batches train as they are, as in kohya
            "steps_per_epoch": self.steps_per_epoch,
            "epochs": self.epochs,
            "total_steps": self.total_steps,
            "token_limit": self.token_limit,
            "long_captions": [dict(c) for c in self.long_captions],
            "upscaled_images": [{**u, "size": list(u["size"]), "bucket": list(u["bucket"])}
                                for u in self.upscaled_images],
        }

    def text(self) -> str:
        """The report as fixed-width tables and short lists, for the console and dataset_report.txt."""
        return "\n".join(_subset_lines(self) + [""] + _bucket_lines(self) + [""] + _schedule_lines(self)
                         + [""] + _caption_lines(self) + [""] + _upscale_lines(self)) + "\n"

    def write(self, output_dir: str) -> tuple[str, str]:
        """Write dataset_report.txt and dataset_report.json into output_dir (atomically); returns the paths."""
        txt = os.path.join(output_dir, REPORT_STEM + ".txt")
        js = os.path.join(output_dir, REPORT_STEM + ".json")
        atomic_write_text(txt, self.text())
        atomic_write_text(js, json.dumps(self.as_dict(), indent=2, ensure_ascii=False) + "\n")
        return txt, js


def build_report(dataset, cfg, count_tokens: Callable[[str], int]) -> Report:
    """The report of a built TrainDataset under `cfg`.

    `count_tokens(caption)` is the family tokenizer's token count without the start / end markers;
    every caption of a multi-caption file is checked, with its subset's caption_prefix / caption_suffix
    (else --caption_prefix / --caption_suffix) added: they are part of every sample's text.
    """
    # a --dataset_config group: each dataset has its own buckets and batch size
    buckets = [row for part in getattr(dataset, "datasets", [dataset]) for row in _bucket_rows(part)]
    batches = sum(b.batches for b in buckets)
    accumulation = int(getattr(cfg, "gradient_accumulation_steps", 1) or 1)
    steps_per_epoch = math.ceil(batches / accumulation)
    total, epochs = schedule_length(steps_per_epoch, getattr(cfg, "max_train_steps", None),
                                    getattr(cfg, "max_train_epochs", None))
    limit = int(getattr(cfg, "max_token_length", None) or DEFAULT_TOKEN_LIMIT)
    return Report(
        subsets=[_subset_row(s, dataset.records) for s in dataset.subsets], buckets=buckets,
        batch_size=dataset.batch_size, gradient_accumulation_steps=accumulation, batches_per_epoch=batches, steps_per_epoch=steps_per_epoch,
        epochs=epochs, total_steps=total, token_limit=limit,
        long_captions=_long_captions(dataset.records, cfg, count_tokens, limit),
        upscaled_images=[{"image": r.path, "size": tuple(r.size), "bucket": tuple(r.bucket)}
                         for r in dataset.records if _upscaled(r)],
    )


def _bucket_dict(row: BucketRow) -> dict:
    """A bucket row in JSON types; training_size only with multi-resolution training."""
    fields = {**asdict(row), "resolution": list(row.resolution)}
    size = fields.pop("training_size")
    return fields if size is None else {**fields, "training_size": list(size)}


def _subset_row(subset, records) -> SubsetRow:
    """Samples are counted from the dataset's records: regularisation repeats are set there."""
    paths = set(subset.image_paths)
    samples = sum(r.num_repeats for r in records if r.path in paths and r.is_reg == subset.is_reg)
    return SubsetRow(subset.label, subset.is_reg, subset.img_count, subset.num_repeats, samples,
                     subset.num_caption_files, subset.img_count - subset.num_caption_files, subset.class_tokens)


def _upscaled(record) -> bool:
    """The image is enlarged to cover its bucket (its resized size exceeds its own size)."""
    return record.resized[0] > record.size[0] or record.resized[1] > record.size[1]


def _bucket_rows(dataset) -> list[BucketRow]:
    """One row per used bucket, in sorted bucket order; batches follow loader.plan_batches: each
    bucket is cut into batches of batch_size, so only its last batch can be short."""
    size = dataset.batch_size
    rows = []
    for (resolution, bucket), samples in dataset.group_counts().items():
        members = [r for r in dataset.variants if r.bucket == bucket and r.resolution == resolution]
        rest = samples % size
        rows.append(BucketRow(tuple(bucket), len(members), samples, math.ceil(samples / size), int(rest > 0),
                              rest, sum(_upscaled(r) for r in members), resolution and tuple(resolution)))
    return rows


def _long_captions(records, cfg, count_tokens, limit: int) -> list[dict]:
    """Images with a caption (any line of a multi-caption file) longer than `limit` tokens."""
    found = []
    for record in records:
        options = record.caption_options
        prefix = options.prefix if options is not None else getattr(cfg, "caption_prefix", None)
        suffix = options.suffix if options is not None else getattr(cfg, "caption_suffix", None)
        lines = [" ".join(p for p in (prefix, line, suffix) if p) for line in record.caption.split("\n")]
        tokens = max(count_tokens(line) for line in lines)
        if tokens > limit:
            found.append({"image": record.path, "tokens": tokens})
    return found


def _table(headers: list[str], rows: list[list]) -> list[str]:
    """Fixed-width columns: text left-aligned, numbers right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], int) for row in rows) and rows != [] for i in range(len(headers))]

    def line(values):
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()

    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells]


def _subset_lines(report: Report) -> list[str]:
    rows = [[s.folder + (" (reg)" if s.is_reg else ""), s.images, s.repeats, s.samples,
             s.caption_files, s.missing_captions, repr(s.class_token) if s.missing_captions else "-"]
            for s in report.subsets]
    headers = ["folder", "images", "repeats", "samples", "captions", "missing", "caption of missing"]
    return ["Subsets"] + _table(headers, rows)


def _bucket_lines(report: Report) -> list[str]:
    rows = [[f"{b.resolution[0]}x{b.resolution[1]}", b.images, b.samples, b.batches, b.short_batches,
             b.samples_in_short_batches, b.upscaled] for b in report.buckets]
    headers = ["bucket", "images", "samples", "batches", "short", "in short", "upscaled"]
    if any(b.training_size for b in report.buckets):  # multi-resolution: buckets listed per resolution
        headers = ["resolution"] + headers
        rows = [[f"{b.training_size[0]}x{b.training_size[1]}" if b.training_size else "-"] + row
                for row, b in zip(rows, report.buckets)]
    lines = [f"Buckets (batch size {report.batch_size})"] + _table(headers, rows)
    short = [b for b in report.buckets if b.short_batches]
    if short:
        lines.append(f"short batches: {len(short)}, holding {sum(b.samples_in_short_batches for b in short)} samples: "
                     "they train as smaller batches, nothing is dropped")
    return lines


def _schedule_lines(report: Report) -> list[str]:
    return [f"batches per epoch: {report.batches_per_epoch}",
            f"steps per epoch: {report.steps_per_epoch} (gradient accumulation {report.gradient_accumulation_steps})",
            f"epochs: {report.epochs}, total steps: {report.total_steps}"]


def _caption_lines(report: Report) -> list[str]:
    lines = [f"captions over {report.token_limit} tokens: {len(report.long_captions)}"
             + (" (the text encoder cuts them there)" if report.long_captions else "")]
    lines += [f"  {c['image']}: {c['tokens']} tokens" for c in report.long_captions]
    return lines


def _upscale_lines(report: Report) -> list[str]:
    lines = [f"images smaller than their bucket (upscaled): {len(report.upscaled_images)}"]
    lines += [f"  {u['image']}: {u['size'][0]}x{u['size'][1]} -> bucket {u['bucket'][0]}x{u['bucket'][1]}"
              for u in report.upscaled_images]
    return lines


def debug_dataset(dataset, max_batches: int = 4) -> str:
    """kohya's --debug_dataset as text: the samples of the first `max_batches` batches of epoch 0
    (path, image size, the size it is resized to and the bucket it is cut to in that batch, which with
    several resolutions is this occurrence's own; regularisation flag; caption as processed). Goes
    through dataset[...] as training does, so those images are decoded and an unreadable one is reported
    here too."""
    sizes = {r.path: r.size for r in dataset.records}
    count = min(max_batches, len(dataset))
    lines = [f"debug_dataset: {len(dataset)} batches per epoch of up to {dataset.batch_size} images; "
             f"the first {count} of epoch 1"]
    for index in range(count):
        batch = dataset[(0, index)]
        lines.append(f"batch {index + 1}: {len(batch['captions'])} samples")
        for path, resized, bucket, caption, is_reg in zip(batch["image_paths"], batch["resized"], batch["buckets"],
                                                          batch["captions"], batch["is_reg"].tolist()):
            size, reg = sizes[path], ", reg" if is_reg else ""
            lines.append(f"  {path}  {size[0]}x{size[1]} -> {resized[0]}x{resized[1]} -> bucket "
                         f"{bucket[0]}x{bucket[1]}{reg}  caption: {caption!r}")
    return "\n".join(lines) + "\n"
