"""DreamBooth (Ruiz et al. 2022): teach the model a subject from a few instance images
under one prompt ("a photo of sks dog"), optionally keeping its idea of the class with a
prior-preservation loss on class images that the base model generates itself.

What trains is the full UNet, or LoRA adapters when [method.lora] is given: DreamBooth
wraps the full or LoRA method and adds only its data and its loss.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from rich.console import Console
from torch.utils.data import Dataset

from difftune.data.samples import PriorPreservationSamples, TrainingSamples
from difftune.data.sources import IMAGE_SUFFIXES
from difftune.data.training import open_training_data
from difftune.families.base import Family, Parts
from difftune.methods.base import FromSettings, Trained, no_extra_inputs
from difftune.methods.dreambooth.spec import DreamBoothMethod, DreamBoothSettings
from difftune.methods.full.method import FullFineTune
from difftune.methods.lora.method import Lora
from difftune.processes import agreed
from difftune.signals import stop_requested


class DreamBooth(FromSettings):
    floor_settings = None

    def __init__(self, config: DreamBoothMethod) -> None:
        super().__init__(config)
        self.settings: DreamBoothSettings = config.dreambooth
        self.inner: Lora | FullFineTune = Lora(config) if config.uses_lora else FullFineTune(config)
        self.card_tags = ["dreambooth", *self.inner.card_tags]
        # What trains, how it is stored, saved and sampled: the inner method's, unchanged.
        self.build = self.inner.build
        self.store, self.restore = self.inner.store, self.inner.restore
        self.save = self.inner.save
        self.generate = self.inner.generate

    def training_data(
        self, family: Family, parts: Parts, trained: Trained, samples: Dataset, accelerator: Any
    ) -> Dataset:
        """With prior preservation: fill the class folder up to num_class_images with the
        base model's images (before any training step), then pair them with the instances."""
        if not self.settings.prior_preservation:
            return samples
        assert isinstance(samples, TrainingSamples)
        folder = Path(self.settings.class_data or "")
        missing = self.settings.num_class_images - len(class_images(folder))
        if missing > 0:
            if accelerator.is_main_process:
                Console(stderr=True).log(f"generating {missing} class image(s) into {folder}")
            self._generate_class_images(family, parts, trained, folder, missing, samples, accelerator)
        accelerator.wait_for_everyone()
        config = samples.config.model_copy(
            # a fuller folder is cut to num_class_images (a seeded subset), as diffusers does
            # class images take their instance's bucket (PriorPreservationSamples.pair)
            update={"path": str(folder), "max_samples": self.settings.num_class_images,
                    "proportion_empty_prompts": 0.0, "buckets": False}
        )
        # One class prompt captions every class image; several were saved in .txt files.
        prompt = self.settings.class_prompt
        classes = open_training_data(config, samples.seed, False, prompt if isinstance(prompt, str) else None)
        return PriorPreservationSamples.pair(samples, classes)

    def _generate_class_images(
        self, family: Family, parts: Parts, trained: Trained, folder: Path, missing: int,
        samples: TrainingSamples, accelerator: Any,
    ) -> None:
        """Each process draws its share; image i always comes from seed + i, so the set
        does not depend on how many processes made it."""
        folder.mkdir(parents=True, exist_ok=True)
        start = len(class_images(folder)) if accelerator.is_main_process else 0
        start = _broadcast_int(accelerator, start)
        mine = list(range(start, start + missing))[accelerator.process_index :: accelerator.num_processes]
        resolution = samples.config.resolution
        settings = {"num_inference_steps": self.settings.class_generation_steps,
                    "height": resolution, "width": resolution}
        batch = self.settings.sample_batch_size
        device = parts.denoiser.device
        for first in range(0, len(mine), batch):
            if agreed(accelerator, stop_requested()):  # the rest are generated when the run resumes
                return
            indices = mine[first : first + batch]
            prompts = [self.class_prompt(i) for i in indices]
            generators = [torch.Generator(device).manual_seed(samples.seed + i) for i in indices]
            with torch.no_grad():
                images = self.inner.generate(family, parts, trained, prompts, None, settings,
                                             generators)  # type: ignore[arg-type]
            for index, prompt, image in zip(indices, prompts, images):
                caption = None if isinstance(self.settings.class_prompt, str) else prompt
                save_class_image(folder, index, image, caption)

    def class_prompt(self, index: int) -> str:
        prompt = self.settings.class_prompt or ""
        return prompt if isinstance(prompt, str) else prompt[index % len(prompt)]

    condition = staticmethod(no_extra_inputs)

    def reduce(self, per_sample_loss: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """Instance loss + prior_loss_weight x class loss (each a mean over its half)."""
        prior = batch.get("prior")
        if prior is None:
            return per_sample_loss.mean()
        prior = prior.to(per_sample_loss.device)
        instance_loss = per_sample_loss[~prior].mean()
        return instance_loss + self.settings.prior_loss_weight * per_sample_loss[prior].mean()

    def usage(self, family: Family, repo: str, base: str) -> str:
        return self.inner.usage(family, repo, base) + f'\nimage = pipe("{self.settings.instance_prompt}").images[0]'


def class_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def save_class_image(folder: Path, index: int, image: Image.Image, caption: str | None = None) -> Path:
    """{index}-{sha1}.png (and its caption in .txt when given), the image written under a
    temporary name first so a killed run never leaves a half-written image that would
    count as done. The caption goes first: an image never lacks its caption."""
    digest = hashlib.sha1(image.tobytes()).hexdigest()[:16]
    path = folder / f"{index:05d}-{digest}.png"
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    partial = folder / f".{path.name}.partial"
    image.save(partial, format="PNG")
    partial.replace(path)
    return path


def _broadcast_int(accelerator: Any, value: int) -> int:
    """The main process's value on every process."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]
