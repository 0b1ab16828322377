"""LoRA, DreamBooth and full fine-tuning with EMA on the tiny pipeline, and their exports
read back by diffusers."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_config
from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler
from PIL import Image
from safetensors.torch import load_file

from difftune.config import build_config
from difftune.method_settings import EmaSettings
from difftune.data.synthetic import fill_circles_rows
from difftune.export.lora import export_lora
from difftune.methods.full.method import generate_text_to_image
from difftune.training.ema import WeightAverage
from difftune.training.events import read_events
from difftune.training.loop import Run

PROMPT = "red circle with blue background"


def caption_folder(root: Path, count: int, seed: int = 0) -> Path:
    """Fill-circles targets as `NNN.png` + `NNN.txt`, the kohya/DreamBooth folder layout."""
    rows = fill_circles_rows(count, 64, seed, ["red", "blue", "green", "yellow"])
    root.mkdir(parents=True)
    for index, (image, caption) in enumerate(zip(rows["image"], rows["text"])):
        image.save(root / f"{index:03d}.png")
        (root / f"{index:03d}.txt").write_text(caption)
    return root


def pipeline_image(pipe: StableDiffusionPipeline) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0]


def load_base(base: Path) -> StableDiffusionPipeline:
    """A pipeline with UniPC, the scheduler difftune samples with."""
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    return pipe


def trained_image(run: Run) -> np.ndarray:
    """What the trained model in memory renders, as pipeline_image renders a loaded one."""
    trainee = run.trainee
    with torch.no_grad():
        memory = generate_text_to_image(
            trainee.family, trainee.parts, run._whole_modules(), PROMPT, None,
            {"num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np"},
            torch.Generator().manual_seed(0))
    return np.asarray(memory)[0]


@pytest.fixture(scope="module")
def captions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return caption_folder(tmp_path_factory.mktemp("captions") / "folder", 8)


@pytest.fixture(scope="module")
def lora_run(tiny_base: Path, captions: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("lora") / "run"
    raw = run_config(tiny_base, captions, out, method={
        "kind": "lora", "train_text_encoder": True, "lora": {
            "rank": 4, "alpha": 8.0, "init": "kaiming",
            "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "conv1", "conv2"]}},
        train={"learning_rate": 1e-2}, validation={"prompts": [PROMPT]})
    run = Run(build_config(raw))
    run.fit()
    return run


def test_lora_trains_only_adapters_and_keeps_the_base(lora_run: Run, tiny_base: Path) -> None:
    for name, component, file in (("unet", "unet", "diffusion_pytorch_model.safetensors"),
                                  ("text_encoder", "text_encoder", "model.safetensors")):
        module = lora_run.accelerator.unwrap_model(lora_run.trainee.trained[name])
        base = load_file(tiny_base / component / file)
        state = module.state_dict()
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable)
        for key, value in state.items():
            if "lora_" in key:
                continue
            original = key.replace(".base_layer", "")
            assert torch.equal(value, base[original]), key
    events = read_events(lora_run.run_dir)
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4]
    checkpoint = lora_run.run_dir / "checkpoints" / "step-000004"
    assert (checkpoint / "unet" / "adapter_model.safetensors").is_file()
    assert not (checkpoint / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_lora_file_loads_in_diffusers_and_reproduces_the_trained_model(lora_run: Run, tiny_base: Path) -> None:
    final = lora_run.run_dir / "final"
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    base_image = pipeline_image(load_base(tiny_base))
    loaded = load_base(tiny_base)
    loaded.load_lora_weights(final)
    lora_image = pipeline_image(loaded)
    assert np.abs(lora_image - base_image).max() > 1e-3  # the LoRA changes the image
    assert np.abs(trained_image(lora_run) - lora_image).max() < 1e-5


def test_kohya_export_maps_to_modules_and_loads(lora_run: Run, tiny_base: Path, tmp_path: Path) -> None:
    out = export_lora(lora_run.run_dir, tmp_path / "kohya.safetensors")
    state = load_file(out)
    pipe = load_base(tiny_base)
    modules = {f"lora_unet_{n.replace('.', '_')}" for n, _ in pipe.unet.named_modules()}
    modules |= {f"lora_te_text_model_{n.replace('.', '_')}" for n, _ in pipe.text_encoder.named_modules()}
    names = {key.split(".")[0] for key in state}
    assert names and names <= modules
    assert all(state[f"{n}.alpha"].item() == 8.0 for n in names)
    assert {key.split(".", 1)[1] for key in state} == {"alpha", "lora_down.weight", "lora_up.weight"}
    assert any(n.startswith("lora_te_") for n in names) and any(n.startswith("lora_unet_") for n in names)
    diffusers_format = load_base(tiny_base)
    diffusers_format.load_lora_weights(lora_run.run_dir / "final")
    pipe.load_lora_weights(out)
    assert np.abs(pipeline_image(pipe) - pipeline_image(diffusers_format)).max() < 1e-5


def test_resumed_lora_run_matches(tiny_base: Path, captions: Path, tmp_path: Path) -> None:
    # Dropout makes the step depend on the DataLoader's and the global RNG: resumed
    # mid-epoch (step 1 of 2 an epoch), after a validation, it must still replay exactly.
    settings = {"batch_size": 4, "checkpoint_every": 1, "max_steps": 3, "learning_rate": 1e-2}
    method = {"kind": "lora", "lora": {"rank": 2, "init": "kaiming", "dropout": 0.3}}
    validation = {"prompts": [PROMPT], "every": 2}
    straight = Run(build_config(run_config(tiny_base, captions, tmp_path / "a", method=method, train=settings,
                                           validation=validation)))
    straight.fit()
    cut = Run(build_config(run_config(tiny_base, captions, tmp_path / "b", method=method,
                                      train={**settings, "max_steps": 1})))
    cut.fit()
    resumed = Run(build_config(run_config(tiny_base, captions, tmp_path / "b", method=method, train=settings,
                                          validation=validation)))
    resumed.fit()
    assert straight.trainee.trained["unet"].training  # train mode: dropout on (also after validation)
    a = load_file(tmp_path / "a" / "final" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "b" / "final" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _dreambooth(base: Path, instances: Path, out: Path, classes: Path, **settings) -> dict:
    dreambooth = {"instance_prompt": "a sks circle", "class_data": str(classes), "class_prompt": "a circle",
                  "num_class_images": 4, "class_generation_steps": 2, "sample_batch_size": 3, **settings}
    return run_config(base, instances, out, method={"kind": "dreambooth", "dreambooth": dreambooth},
                      train={"batch_size": 2, "max_steps": 2, "checkpoint_every": 10, "learning_rate": 1e-3})


def test_dreambooth_generates_class_images_and_finishes(tiny_base: Path, tmp_path: Path) -> None:
    instances = caption_folder(tmp_path / "instances", 4)
    for caption in instances.glob("*.txt"):
        caption.unlink()  # a plain folder of images: the instance prompt is the caption
    classes = tmp_path / "classes"
    raw = _dreambooth(tiny_base, instances, tmp_path / "run", classes, prior_preservation=True)
    final = Run(build_config(raw)).fit()
    made = sorted(classes.glob("*.png"))
    assert len(made) == 4 and all(re.fullmatch(r"\d{5}-[0-9a-f]{16}\.png", p.name) for p in made)
    assert Image.open(made[0]).size == (64, 64)
    assert (final / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    stamps = [p.stat().st_mtime_ns for p in made]
    Run(build_config(_dreambooth(tiny_base, instances, tmp_path / "again", classes,
                                 prior_preservation=True))).fit()
    assert [p.stat().st_mtime_ns for p in sorted(classes.glob("*.png"))] == stamps  # none regenerated


def test_prior_loss_weight_zero_equals_plain_fine_tuning(tiny_base: Path, tmp_path: Path) -> None:
    instances = caption_folder(tmp_path / "instances", 4)
    classes = caption_folder(tmp_path / "classes", 4, seed=5)
    for caption in [*instances.glob("*.txt"), *classes.glob("*.txt")]:
        caption.unlink()
    with_prior = _dreambooth(tiny_base, instances, tmp_path / "prior", classes,
                             prior_preservation=True, prior_loss_weight=0.0)
    plain = _dreambooth(tiny_base, instances, tmp_path / "plain", classes)
    finals = [Run(build_config(raw)).fit() for raw in (with_prior, plain)]
    a, b = (load_file(f / "unet" / "diffusion_pytorch_model.safetensors") for f in finals)
    base = load_file(tiny_base / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(a[k], base[k]) for k in a)
    # Same noise per instance sample; the class half only changes the batched maths.
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_ema_follows_the_decay_formula() -> None:
    layer = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    average = WeightAverage({"layer": layer}, EmaSettings(decay=0.5, update_every=2, start_step=1))
    expected = 1.0
    for step in range(1, 9):
        with torch.no_grad():
            layer.weight.fill_(float(step + 1))  # "training" moves the weight
        average.after_step(step)
        if step > 1 and step % 2 == 0:
            n = (step - 2) // 2 + 1  # updates so far
            decay = 0.0 if n <= 1 else min(0.5, n / (9 + n))  # (1 + (n - 1)) / (10 + (n - 1))
            expected = decay * expected + (1 - decay) * (step + 1)
    with average.applied():
        assert layer.weight[0, 0].item() == pytest.approx(expected, rel=1e-6)
    assert layer.weight[0, 0].item() == 9.0  # the trained weight is back


def test_full_with_ema_exports_the_average(tiny_base: Path, captions: Path, tmp_path: Path) -> None:
    raw = run_config(tiny_base, captions, tmp_path / "run",
                     method={"kind": "full", "train_text_encoder": True, "ema": {"decay": 0.9}},
                     objective={"snr_gamma": 5.0, "noise_offset": 0.05, "input_perturbation": 0.1},
                     train={"checkpoint_every": 10})
    run = Run(build_config(raw))
    final = run.fit()
    exported = load_file(final / "unet" / "diffusion_pytorch_model.safetensors")
    live = run.accelerator.unwrap_model(run.trainee.trained["unet"]).state_dict()
    names = [n for n, p in run.trainee.trained["unet"].named_parameters() if p.requires_grad]
    shadow = dict(zip(names, run.ema.average.shadow_params))
    assert all(torch.equal(exported[k], shadow[k]) for k in names)
    assert any(not torch.equal(exported[k], live[k]) for k in names)
    trained_te = load_file(final / "text_encoder" / "model.safetensors")
    base_te = load_file(tiny_base / "text_encoder" / "model.safetensors")
    assert any(not torch.equal(trained_te[k], base_te[k]) for k in base_te)
    assert pipeline_image(load_base(final)).shape == (64, 64, 3)


def test_v_prediction_override_is_saved_with_the_pipeline(tiny_base: Path, captions: Path, tmp_path: Path) -> None:
    raw = run_config(tiny_base, captions, tmp_path / "run", method={"kind": "full"},
                     objective={"prediction_type": "v_prediction"},
                     train={"max_steps": 1, "checkpoint_every": 10})
    final = Run(build_config(raw)).fit()
    assert load_base(final).scheduler.config.prediction_type == "v_prediction"


def test_dreambooth_with_buckets_and_cache(tiny_base: Path, tmp_path: Path) -> None:
    """Instances of three shapes in aspect buckets; each class image (square) takes its
    instance's bucket, so a batch stacks. The cache of both halves trains the same."""
    from test_buckets import _three_shapes

    instances = _three_shapes(tmp_path / "instances")
    classes = caption_folder(tmp_path / "classes", 5, seed=5)
    for caption in classes.glob("*.txt"):
        caption.unlink()

    def config(out: str, **data) -> dict:
        raw = _dreambooth(tiny_base, instances, tmp_path / out, classes, prior_preservation=True, num_class_images=5)
        raw["data"].update({"buckets": True, "bucket_step": 16, **data})
        raw["train"]["max_steps"] = 3
        return raw

    plain = Run(build_config(config("plain")))
    batch = next(iter(plain.loader))
    assert batch["pixels"].shape[0] == 4 and batch["prior"].tolist() == [False, False, True, True]
    sizes = {tuple(s) for s in plain.sampler.buckets}
    assert sizes == {(80, 48), (48, 80), (64, 64)}  # the instances' buckets; class images take them
    plain.fit()
    cached = Run(build_config(config("cached", cache_latents=True, cache_text=True,
                                     encoded_cache_dir=str(tmp_path / "cache"))))
    cached.fit()
    stats = [e for e in read_events(tmp_path / "cached") if e["event"] == "cache"][-1]
    # 12 instances; 5 class images, each at the buckets of the instances it pairs with
    assert stats["latents_encoded"] == 12 + len({(i % 5, (i % 12) % 3) for i in range(12)})
    assert stats["texts_encoded"] == 3  # the instance prompt, "" and the class prompt
    a, b = (load_file(tmp_path / r / "final" / "unet" / "diffusion_pytorch_model.safetensors") for r in ("plain", "cached"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
