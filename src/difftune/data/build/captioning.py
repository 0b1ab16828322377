"""`difftune data caption IN --model M`: a caption for every image of a prepared dataset
from a transformers image-to-text model (BLIP as in diffusers' ControlNet guide; BLIP-2,
Florence-2 or a VLM where the user has the weights), in batches, on the GPU when there
is one.

- Existing captions are kept unless --overwrite; --prefix and --suffix wrap each new one.
- Only metadata.jsonl changes: it is replaced in one step once every caption is made,
  the previous one kept as .difftune/metadata.before-caption.jsonl. No image is touched.
- Captions are journalled as they are made: a stopped job captions only what is left.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from difftune.data.build.conditioning import check_model_path, read_dataset, read_rgb
from difftune.data.build.confine import check_link_inside
from difftune.data.build.jobs import (
    BOOKKEEPING,
    METADATA,
    Journal,
    Progress,
    bookkeeping,
    write_json,
    write_metadata,
)
from difftune.data.build.limits import check_caption
from difftune.errors import InputError

JOURNAL = "caption-journal.jsonl"
BACKUP = "metadata.before-caption.jsonl"


@dataclass(frozen=True)
class CaptionSettings:
    model: str
    prompt: str | None = None
    """Text the model continues or answers (BLIP: "a photography of"; Florence-2: "<CAPTION>")."""
    prefix: str = ""
    suffix: str = ""
    overwrite: bool = False
    batch_size: int = 8
    max_new_tokens: int = 40
    column: str = "text"


def caption(source: Path, settings: CaptionSettings) -> dict[str, Any]:
    """Caption the dataset in `source` in place (its metadata.jsonl); returns a summary."""
    check_caption(settings)
    rows = read_dataset(source, "caption")
    check_model_path(settings.model)  # before the journal: a refusal writes nothing into IN
    for name in (JOURNAL, BACKUP):  # appended to, copied to: a link out of IN would be written through
        check_link_inside(source, source / BOOKKEEPING / name, "IN")
    todo = [i for i, row in enumerate(rows) if settings.overwrite or not str(row.get(settings.column) or "").strip()]
    identity = {k: v for k, v in asdict(settings).items() if k not in ("batch_size", "overwrite")}
    journal = Journal(bookkeeping(source) / JOURNAL, identity)
    left = [i for i in todo if rows[i]["file_name"] not in journal.done]
    progress = Progress("caption", len(todo), already=len(todo) - len(left))
    try:
        if left:
            captioner = Captioner(settings)
            for start in range(0, len(left), settings.batch_size):
                batch = left[start:start + settings.batch_size]
                texts = captioner([source / rows[i]["file_name"] for i in batch])
                for i, text in zip(batch, texts):
                    journal.record(rows[i]["file_name"], {"text": f"{settings.prefix}{text}{settings.suffix}"})
                progress.advance(len(batch))
    finally:
        journal.close()
    for i in todo:
        rows[i][settings.column] = journal.done[rows[i]["file_name"]]["text"]
    kept = source / BOOKKEEPING / BACKUP
    if not kept.exists():
        shutil.copyfile(source / METADATA, kept)
    write_metadata(source, rows)
    summary = {"verb": "caption", "dataset": str(source), "model": settings.model, "captioned": len(todo),
               "kept": len(rows) - len(todo), "settings": asdict(settings)}
    write_json(bookkeeping(source) / "caption-report.json", summary)
    os.remove(journal.path)  # done: a later caption run with --overwrite starts afresh
    return summary


class Captioner:
    """AutoProcessor + AutoModelForImageTextToText: one generate per batch."""

    def __init__(self, settings: CaptionSettings) -> None:
        import torch
        import transformers

        self.settings = settings
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        check_model_path(settings.model)
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(settings.model)
            self.model = transformers.AutoModelForImageTextToText.from_pretrained(settings.model)
        except (OSError, ValueError, KeyError) as error:
            raise InputError(f"--model {settings.model!r} could not be loaded as an image-to-text model: "
                             f"{str(error).splitlines()[0]}. Give a folder with its config.json, weights and "
                             "processor files, or a Hub id (e.g. Salesforce/blip-image-captioning-large; "
                             "downloaded once, when online)") from None
        if self.device == "cuda":
            self.model.half()
        self.model.to(self.device).eval()

    def __call__(self, files: list[Path]) -> list[str]:
        import torch

        images = [read_rgb(f) for f in files]
        extra = {"text": [self.settings.prompt] * len(images)} if self.settings.prompt else {}
        inputs = self.processor(images=images, return_tensors="pt", **extra).to(self.device)
        if self.device == "cuda":
            inputs = {k: v.half() if v.is_floating_point() else v for k, v in inputs.items()}
        with torch.inference_mode():
            generated = self.model.generate(**inputs, max_new_tokens=self.settings.max_new_tokens)
        prompt_ids = inputs.get("input_ids")
        if (prompt_ids is not None and not self.model.config.is_encoder_decoder
                and generated.shape[1] > prompt_ids.shape[1] and (generated[:, :prompt_ids.shape[1]] == prompt_ids).all()):
            generated = generated[:, prompt_ids.shape[1]:]  # a decoder-only model repeats its prompt
        texts = self.processor.batch_decode(generated, skip_special_tokens=True)
        return [_clean(text, self.settings.prompt) for text in texts]


def _clean(text: str, prompt: str | None) -> str:
    """One line, without the prompt BLIP repeats at the start of its answer."""
    text = " ".join(text.split())
    if prompt and text.lower().startswith(prompt.lower()):
        text = text[len(prompt):].strip()
    return text
