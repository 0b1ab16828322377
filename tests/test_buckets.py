"""Aspect-ratio buckets: the bucket set, assignment, one bucket per batch, resumable
order, and training (with and without the cache) on images of three shapes."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_config
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from difftune.config import build_config
from difftune.data.buckets import BucketBatchSampler, assign_bucket, bucket_sizes
from difftune.training.events import read_events
from difftune.training.loop import Run, train


def test_bucket_sizes_respect_step_area_and_aspect() -> None:
    sizes = bucket_sizes(512, 64, 2.0)
    assert (512, 512) in sizes and (384, 640) in sizes and (640, 384) in sizes
    for width, height in sizes:
        assert width % 64 == 0 and height % 64 == 0
        assert width * height <= 512 * 512
        assert max(width / height, height / width) <= 2.0


def test_assignment_follows_the_aspect_ratio() -> None:
    sizes = bucket_sizes(512, 64, 2.0)
    assert assign_bucket((1024, 1024), sizes, False, 64) == (512, 512)
    wide = assign_bucket((1600, 900), sizes, False, 64)
    assert wide[0] > wide[1] and abs(math.log(wide[0] / wide[1]) - math.log(16 / 9)) < 0.15
    # no_upscale: only buckets the image covers; a small image keeps its own size
    assert assign_bucket((700, 500), sizes, True, 64) == (576, 448)
    assert assign_bucket((300, 200), sizes, True, 64) == (256, 192)
    assert assign_bucket((300, 200), sizes, False, 64) == (640, 384)


def test_batches_are_one_bucket_each_seeded_and_resumable() -> None:
    buckets = [(64, 64)] * 7 + [(96, 40)] * 5 + [(40, 96)] * 3
    sampler = BucketBatchSampler(buckets, seed=3, batch_size=2, num_processes=2)
    sampler.start_epoch(1)
    batches = list(sampler)
    assert len(batches) % 2 == 0 and sampler.padded == len(batches) * 2
    assert all(len({buckets[i] for _, i in batch}) == 1 for batch in batches)
    assert {i for batch in batches for _, i in batch} == set(range(15))  # every sample, padding aside
    assert batches == list(sampler)  # the same again
    sampler.start_epoch(1, skip=6)  # 3 batches done, counted in samples
    assert list(sampler) == batches[3:]
    sampler.start_epoch(2)
    assert list(sampler) != batches
    assert sampler.summary() == {"40x96": 3, "64x64": 7, "96x40": 5}


def _three_shapes(folder: Path) -> Path:
    folder.mkdir()
    colours = ["red", "green", "blue", "yellow"]
    for index in range(12):
        size = [(96, 64), (64, 96), (64, 64)][index % 3]
        image = Image.new("RGB", size, colours[index % 4])
        ImageDraw.Draw(image).ellipse((8, 8, 40, 40), fill=colours[(index + 1) % 4])
        image.save(folder / f"{index:03d}.png")
        (folder / f"{index:03d}.txt").write_text(f"{colours[(index + 1) % 4]} circle with {colours[index % 4]} background")
    return folder


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _three_shapes(tmp_path_factory.mktemp("shapes") / "folder")


def _bucketed(base: Path, data: Path, out: Path, **data_keys) -> dict:
    return run_config(base, data, out, method={"kind": "full"}, data={
        "buckets": True, "bucket_step": 16, "bucket_max_aspect": 2.0, **data_keys},
        train={"batch_size": 2, "max_steps": 4, "checkpoint_every": 2})


def test_training_with_buckets_and_resume(tiny_base: Path, shapes: Path, tmp_path: Path) -> None:
    run = Run(build_config(_bucketed(tiny_base, shapes, tmp_path / "a")))
    run.fit()
    summary = [e for e in read_events(tmp_path / "a") if e["event"] == "buckets"][0]["samples_per_bucket"]
    assert summary == {"48x80": 4, "64x64": 4, "80x48": 4}
    cut = _bucketed(tiny_base, shapes, tmp_path / "b")
    cut["train"]["max_steps"] = 2
    train(build_config(cut))
    train(build_config(_bucketed(tiny_base, shapes, tmp_path / "b")))
    a = load_file(tmp_path / "a" / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cached_buckets_match_uncached(tiny_base: Path, shapes: Path, tmp_path: Path) -> None:
    train(build_config(_bucketed(tiny_base, shapes, tmp_path / "plain")))
    train(build_config(_bucketed(tiny_base, shapes, tmp_path / "cached", cache_latents=True, cache_text=True,
                                 encoded_cache_dir=str(tmp_path / "cache"))))
    a = load_file(tmp_path / "plain" / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "cached" / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def _three_shapes_with_control(folder: Path) -> Path:
    """_three_shapes as an imagefolder with conditioning images of the same sizes."""
    source = _three_shapes(folder.parent / f"{folder.name}-source")
    (folder / "images").mkdir(parents=True)
    (folder / "conditioning_images").mkdir()
    rows = []
    for image in sorted(source.glob("*.png")):
        Image.open(image).save(folder / "images" / image.name)
        Image.open(image).convert("L").convert("RGB").save(folder / "conditioning_images" / image.name)
        rows.append({"file_name": f"images/{image.name}", "conditioning_image": f"conditioning_images/{image.name}",
                     "text": image.with_suffix(".txt").read_text()})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


@pytest.mark.parametrize("kind", ["controlnet", "lora"])
def test_controlnet_and_lora_train_in_buckets_with_the_cache(kind: str, tiny_base: Path, tmp_path: Path) -> None:
    data = _three_shapes_with_control(tmp_path / "data") if kind == "controlnet" else _three_shapes(tmp_path / "data")
    raw = _bucketed(tiny_base, data, tmp_path / "run", cache_latents=True, cache_text=True,
                    encoded_cache_dir=str(tmp_path / "cache"))
    raw["method"] = {"kind": kind}
    raw["train"]["max_steps"] = 2
    run = Run(build_config(raw))
    for batch in run.loader:
        side = run.sampler.buckets[batch["keys"][0][1]]
        assert tuple(batch["latent_mean"].shape[-2:]) == (side[1] // 2, side[0] // 2)  # the tiny VAE halves
        if kind == "controlnet":  # the control image, cached per bucket, at the target's size
            assert tuple(batch["conditioning_pixels"].shape[-2:]) == (side[1], side[0])
    run.fit()
    summary = [e for e in read_events(tmp_path / "run") if e["event"] == "buckets"][0]["samples_per_bucket"]
    assert summary == {"48x80": 4, "64x64": 4, "80x48": 4}
