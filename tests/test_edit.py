"""Edit training (kind "edit") on FLUX.1 Kontext: the reference tokens, position ids and
target slice checked against diffusers' FluxKontextPipeline; an edit LoRA that the
pipeline's load_lora_weights reads and that changes the edit; a full run that saves a
FluxKontextPipeline; rows without a reference; the cache; what is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WORDS, run_config
from diffusers import FluxKontextPipeline
from PIL import Image, ImageDraw

from difftune.config import ConfigError, build_config
from difftune.data.sources import DataError
from difftune.families import ModelInputs, get_family
from difftune.families.flux.family import pack
from difftune.families.flux.tiny import build_tiny_flux
from difftune.training.loop import train

INSTRUCTION = "red circle"
COLOURS = ["red", "green", "blue", "yellow"]


@pytest.fixture(scope="module")
def kontext(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("kontext") / "tiny-flux", WORDS + ["make", "the"], seed=0,
                           t5_length=32)


def _disc(colour: str, background: str, box: tuple[int, int, int, int], size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    ImageDraw.Draw(image).ellipse(box, fill=colour)
    return image


def write_edits(folder: Path, rows: int, missing: tuple[int, ...] = (), several: tuple[int, ...] = ()) -> Path:
    """A metadata.jsonl folder of edits: the reference's disc recoloured in the target.
    Rows in `missing` have no reference (a text-to-image caption); rows in `several` two."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for row in range(rows):
        box = (8 + row * 3, 10, 40 + row * 3, 42)
        old, new = COLOURS[row % 4], COLOURS[(row + 1) % 4]
        _disc(new, "white", box).save(folder / f"target-{row}.png")
        _disc(old, "white", box).save(folder / f"reference-{row}.png")
        reference: object = f"reference-{row}.png"
        if several:  # a list column (metadata.jsonl keeps one type per column): one or two each
            reference = [f"reference-{row}.png"] + ([f"target-{(row + 1) % rows}.png"] if row in several else [])
        text = f"make the circle {new}"
        if row in missing:
            reference, text = None, f"{new} circle with white background"
        lines.append(json.dumps({"file_name": f"target-{row}.png", "reference_image": reference, "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def edits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_edits(tmp_path_factory.mktemp("edits") / "data", 4)


def _edit_run(base: Path, data: Path, out: Path, **method) -> dict:
    raw = run_config(base, data, out, train={"max_steps": 2, "checkpoint_every": 2, "learning_rate": 1e-2},
                     validation={"every": 2, "steps": 2, "prompts": ["make the circle red"],
                                 "images": [str(data / "reference-0.png")]})
    raw["model"]["family"] = "flux"
    raw["method"] = {"kind": "edit", **method}
    return raw


def _pipeline(base: Path) -> FluxKontextPipeline:
    pipe = FluxKontextPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _edited(pipe: FluxKontextPipeline, reference: Image.Image) -> np.ndarray:
    arguments = get_family("flux").edit_arguments(reference, 64, 64)
    return pipe(prompt="make the circle red", num_inference_steps=2, output_type="np", max_sequence_length=32,
                generator=torch.Generator().manual_seed(0), **arguments).images[0]


def test_the_reference_tokens_and_ids_are_what_fluxkontextpipeline_builds(kontext: Path) -> None:
    family = get_family("flux")
    parts = family.load(build_config(_edit_run(kontext, Path("."), Path("."), lora={})).model)
    pipe = _pipeline(kontext)
    text = family.encode_prompts(parts, ["make the circle red"])
    embeds, pooled, text_ids = pipe.encode_prompt(["make the circle red"], prompt_2=None, max_sequence_length=32)
    reference = torch.rand(1, 3, 48, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents, image_latents, latent_ids, image_ids = pipe.prepare_latents(
        reference, 1, 1, 64, 32, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0))
    noisy = torch.randn(1, 1, 64, 32, generator=torch.Generator().manual_seed(2))  # 64x32 px, VAE x1
    encoded = family.encode_images(parts, reference, None)
    assert torch.allclose(pack(encoded), image_latents, atol=1e-6)  # the pipeline's argmax = the posterior mean
    inputs = ModelInputs(noisy, torch.tensor([600.0]), text, extra={"references": [[encoded[0]]]})
    with torch.no_grad():
        ours = family.predict(parts, inputs)
        theirs = pipe.transformer(hidden_states=torch.cat([pack(noisy), image_latents], 1),
                                  timestep=torch.tensor([0.6]), guidance=torch.full((1,), 3.5),
                                  pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                                  img_ids=torch.cat([latent_ids, image_ids]), return_dict=False)[0]
    assert ours.shape == noisy.shape
    assert torch.allclose(pack(ours), theirs[:, : pack(noisy).shape[1]], atol=1e-5)


def test_an_edit_lora_loads_into_fluxkontextpipeline_and_changes_the_edit(kontext: Path, edits: Path,
                                                                         tmp_path: Path) -> None:
    """...and its validation scores the edit metric against the LoRA-off floor."""
    from difftune.data.synthetic import write_fill_circles_edit
    from difftune.training.events import read_events

    raw = _edit_run(kontext, edits, tmp_path / "run", lora={"rank": 4})
    held = write_fill_circles_edit(tmp_path / "held", 2, 64, seed=7)
    raw["validation"] |= {"metric": "fill_circles_edit", "metric_data": str(held), "metric_samples": 2}
    final = train(build_config(raw))
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "run" / "validation" / "step-000002" / "pair-00-grid.png").is_file()
    validation = next(e for e in read_events(tmp_path / "run") if e["event"] == "validation")
    assert set(validation["metrics"]) == set(validation["floor"]) == {"shape_iou", "colour_accuracy"}
    assert (tmp_path / "run" / "validation" / "floor" / "metric-grid.png").is_file()
    reference = Image.open(edits / "reference-0.png")
    pipe = _pipeline(kontext)
    before = _edited(pipe, reference)
    pipe.load_lora_weights(str(final))
    after = _edited(pipe, reference)
    assert np.abs(after - before).max() > 1e-3
    out = tmp_path / "edited.png"
    done = subprocess.run([sys.executable, "-m", "difftune", "generate", "--lora", str(tmp_path / "run"),
                           "--image", str(edits / "reference-1.png"), "--prompt", "make the circle red",
                           "--steps", "2", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert Image.open(out).size == (64, 64)


def test_rows_without_a_reference_train_beside_rows_with_one(kontext: Path, tmp_path: Path) -> None:
    """A batch mixing both runs as two groups; the full run saves a FluxKontextPipeline."""
    data = write_edits(tmp_path / "mixed", 4, missing=(1, 2))
    raw = _edit_run(kontext, data, tmp_path / "run")
    raw["data"]["cache_latents"] = False
    final = train(build_config(raw))
    assert json.loads((final / "model_index.json").read_text())["_class_name"] == "FluxKontextPipeline"
    pipe = _pipeline(final)
    assert _edited(pipe, Image.open(data / "reference-0.png")).shape == (64, 64, 3)


def test_an_edit_run_from_the_latent_cache_trains_as_one_without(kontext: Path, edits: Path,
                                                                 tmp_path: Path) -> None:
    from safetensors.torch import load_file

    finals = {}
    for cached in (False, True):
        raw = _edit_run(kontext, edits, tmp_path / f"run-{cached}", lora={"rank": 4})
        raw["data"] |= {"cache_latents": cached, "random_flip": True, "encoded_cache_dir": str(tmp_path / "cache")}
        raw["validation"] = {"every": 100}
        finals[cached] = load_file(train(build_config(raw)) / "pytorch_lora_weights.safetensors")
    assert all(torch.allclose(finals[False][k], finals[True][k], atol=1e-5) for k in finals[False])


def test_what_an_edit_run_refuses(kontext: Path, tiny_base: Path, tmp_path: Path) -> None:
    from difftune.training.plan import plan_run

    several = write_edits(tmp_path / "several", 3, several=(1,))
    with pytest.raises(DataError, match=r"row\(s\) 1 .*more than 1 reference.*FluxKontextPipeline"):
        plan_run(build_config(_edit_run(kontext, several, tmp_path / "a")))
    unnamed = write_edits(tmp_path / "unnamed", 2)
    raw = _edit_run(kontext, unnamed, tmp_path / "b")
    raw["data"]["reference_image_column"] = "source"
    with pytest.raises(DataError, match=r"data.reference_image_column = 'source' is not a column"):
        plan_run(build_config(raw))
    sd = _edit_run(tiny_base, unnamed, tmp_path / "c")
    sd["model"]["family"] = "sd"
    with pytest.raises(ConfigError, match="edit"):
        build_config(sd)
    mixed = write_edits(tmp_path / "mixed", 3, missing=(0,))
    raw = _edit_run(kontext, mixed, tmp_path / "d")
    raw["data"]["cache_latents"] = True
    with pytest.raises(ConfigError, match="1 of 3 rows have no reference or several"):
        train(build_config(raw))


@pytest.mark.parametrize("lora", [None, {"rank": 4}], ids=["full", "lora"])
def test_a_resumed_edit_run_ends_with_the_same_weights(lora: dict | None, kontext: Path, edits: Path,
                                                       tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from difftune.training.loop import Run

    def config(out: Path, steps: int) -> dict:
        raw = _edit_run(kontext, edits, out, **({"lora": lora} if lora else {}))
        raw["train"] |= {"batch_size": 2, "checkpoint_every": 2, "max_steps": steps}
        raw["data"] |= {"random_flip": True}
        raw["validation"] = {"every": 100}
        return raw

    train(build_config(config(tmp_path / "a", 4)))
    train(build_config(config(tmp_path / "b", 2)))
    resumed = Run(build_config(config(tmp_path / "b", 4)))
    assert resumed.resume_from == tmp_path / "b" / "checkpoints" / "step-000002"
    resumed.fit()
    name = "pytorch_lora_weights.safetensors" if lora else "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "a" / "final" / name), load_file(tmp_path / "b" / "final" / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_references_follow_their_targets_into_buckets_and_an_nf4_base_trains(kontext: Path, tmp_path: Path) -> None:
    """Wide and tall targets in buckets, each reference cropped and flipped with its target
    (so its latents make as many tokens); the adapters train on a 4-bit frozen base."""
    from difftune.data.training import open_training_data
    from difftune.families.flux.family import FAMILY

    data = tmp_path / "shapes"
    data.mkdir()
    lines = []
    for row, size in enumerate(((96, 64), (64, 96), (96, 64), (64, 96))):
        Image.new("RGB", size, COLOURS[row]).save(data / f"target-{row}.png")
        Image.new("RGB", (size[0] // 2, size[1] // 2), COLOURS[row - 1]).save(data / f"reference-{row}.png")
        lines.append(json.dumps({"file_name": f"target-{row}.png", "reference_image": f"reference-{row}.png",
                                 "text": f"make the circle {COLOURS[row]}"}))
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    raw = _edit_run(kontext, data, tmp_path / "run", lora={"rank": 4})
    raw["data"] |= {"buckets": True, "bucket_step": 16, "random_flip": True}
    raw["model"]["quantize"] = "nf4"
    raw["validation"] = {"every": 100}
    config = build_config(raw)
    samples = open_training_data(config.data, 0, True, references=True)
    samples.reference_size = FAMILY.reference_size
    for index in range(len(samples)):
        sample = samples[(0, index)]
        assert sample["references"][0].shape[1:] == sample["pixels"].shape[1:]  # the target's bucket
        assert torch.allclose(sample["references"][0][:, 0, 0], torch.tensor(
            [channel / 255 for channel in Image.new("RGB", (1, 1), COLOURS[index - 1]).getpixel((0, 0))]))
    assert train(config) is not None


def test_a_qwen_image_edit_run_from_the_latent_cache_trains_as_one_without(tmp_path: Path) -> None:
    """Qwen-Image-Edit's references are encoded at about a megapixel, not at the target's
    size: the cache holds their latents (both flip sides), the instruction sees them read
    again, and the adapters come out as from encoding every step."""
    from safetensors.torch import load_file

    from difftune.data.synthetic import write_fill_circles_edit
    from difftune.families.qwenimage_edit.tiny import build_tiny_qwenimage_edit

    base = build_tiny_qwenimage_edit(tmp_path / "qwen-edit", WORDS, seed=0)
    data = write_fill_circles_edit(tmp_path / "edits", 2, 64, seed=0)
    finals = {}
    for cached in (False, True):
        raw = run_config(base, data, tmp_path / f"run-{cached}", train={"max_steps": 2, "learning_rate": 1e-2},
                         model={"family": "qwenimage_edit"})
        raw["method"] = {"kind": "edit", "lora": {"rank": 4}}
        raw["data"] |= {"cache_latents": cached, "random_flip": True, "encoded_cache_dir": str(tmp_path / "cache")}
        raw["validation"] = {"every": 100}
        finals[cached] = load_file(train(build_config(raw)) / "pytorch_lora_weights.safetensors")
    assert all(torch.allclose(finals[False][k], finals[True][k], atol=1e-5) for k in finals[False])
