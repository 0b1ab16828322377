"""Qwen-Image and Qwen-Image-Edit: the prompt, the latents, the time shift, the transformer
call and the ControlNet's inputs checked against diffusers' own QwenImagePipeline,
QwenImageControlNetPipeline, QwenImageEditPipeline and QwenImageEditPlusPipeline on
pipelines built here from diffusers' and transformers' classes; LoRA, full and ControlNet
runs whose results those pipelines load and render."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WORDS, run_config
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageControlNetModel,
    QwenImageControlNetPipeline,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
from PIL import Image

from difftune.config import ConfigError, build_config
from difftune.data.sources import DataError
from difftune.families import ModelInputs, family_of_pipeline, get_family
from difftune.families.qwenimage.tiny import build_tiny_qwenimage, tiny_qwen_vl, write_qwen_tokenizer
from difftune.families.qwenimage_edit.family import load_processor
from difftune.families.qwenimage_edit.tiny import build_tiny_qwenimage_edit
from difftune.training.loop import train

PROMPT = "red circle with blue background"


@pytest.fixture(scope="module")
def tiny_qwenimage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwenimage(tmp_path_factory.mktemp("qwen") / "tiny-qwenimage", WORDS, seed=0)


@pytest.fixture(scope="module")
def other_qwenimage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another Qwen-Image shape, built here rather than by the family's builder: a VAE of
    factor 4 with 6 latent channels, a text encoder 24 wide, a transformer of one block of
    3 heads of 8, and a schedule whose shift runs between other token counts."""
    out = tmp_path_factory.mktemp("qwen-other")
    tokenizer = write_qwen_tokenizer(out / "scratch", WORDS)
    torch.manual_seed(1)
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=6, dim_mult=[1, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.3, -0.2, 0.1, 0.0, 0.5, -0.4],
                                 latents_std=[0.5, 2.0, 1.5, 1.0, 0.8, 1.2])
    text_encoder = tiny_qwen_vl({"text": 24, "text_heads": 2, "mrope": (2, 2, 2), "vision": 8}, tokenizer)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=24, out_channels=6, num_layers=1,
                                              attention_head_dim=8, num_attention_heads=3, joint_attention_dim=24,
                                              axes_dims_rope=(4, 2, 2))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.3, max_shift=1.2,
                                                base_image_seq_len=16, max_image_seq_len=1024,
                                                time_shift_type="exponential")
    QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                      transformer=transformer).save_pretrained(out / "base")
    return out / "base"


@pytest.fixture(scope="module")
def tiny_edit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwenimage_edit(tmp_path_factory.mktemp("edit") / "tiny-edit", WORDS, seed=0)


@pytest.fixture(scope="module")
def tiny_edit_plus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwenimage_edit(tmp_path_factory.mktemp("plus") / "tiny-plus", WORDS, seed=0, plus=True)


def _run(base: Path, data: Path, out: Path, family: str = "qwenimage", **method: object) -> dict:
    raw = run_config(base, data, out, train={"max_steps": 2, "checkpoint_every": 2, "learning_rate": 1e-2},
                     validation={"every": 2, "steps": 2, "prompts": [PROMPT]})
    raw["model"]["family"] = family
    raw["method"] = method
    if method.get("kind") == "controlnet":
        raw["validation"] |= {"images": [str(data / "conditioning_images" / "000000.png")], "num_images": 1}
    return raw


def _load(base: Path, family: str = "qwenimage"):
    return get_family(family).load(build_config(_run(base, Path("."), Path("."), family, kind="lora")).model)


def _pipeline(cls: type, base: Path, **parts: object):
    pipe = cls.from_pretrained(base, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe, **call: object) -> np.ndarray:
    """64x64 in two steps (the prompt by name: the edit pipelines take the image first)."""
    return pipe(prompt=PROMPT, num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0), **call).images[0]


def _catch(module: torch.nn.Module) -> dict:
    """The keyword arguments and output (a tuple's first) of the module's next calls (the
    last kept: the second of two steps, as a single step's time is not finite with the
    bases' shift_terminal)."""
    seen: dict = {}

    def catch(module: object, args: tuple, kwargs: dict, output: object) -> None:
        seen.update(kwargs, output=output[0] if isinstance(output, tuple) else output)

    module.register_forward_hook(catch, with_kwargs=True)
    return seen


def _unpack(tokens: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """Packed 2x2 patches back to (B, C, H, W), with the pipeline's own unpacking (factor 1)."""
    return QwenImagePipeline._unpack_latents(tokens, rows * 2, columns * 2, 1)[:, :, 0]


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


# --- Qwen-Image: what the family computes, against the pipeline --------------------------


def test_prompt_latents_time_and_transformer_call_are_what_the_pipeline_uses(other_qwenimage: Path) -> None:
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from difftune.families.limits import size_rule
    from difftune.objectives import FlowMatching

    family = get_family("qwenimage")
    parts = _load(other_qwenimage)
    pipe = _pipeline(QwenImagePipeline, other_qwenimage)
    system = pipe.prompt_template_encode.split("{}")[0]  # the template's system prefix: what the pipeline drops
    assert len(pipe.tokenizer(system).input_ids) == pipe.prompt_template_encode_start_idx == 34
    captions = [PROMPT, "", "green circle with " * 200]  # the last one past the pipeline's 512 tokens
    text = family.encode_prompts(parts, captions)
    embeds, mask = pipe.encode_prompt(captions, device="cpu", max_sequence_length=512)
    # each caption's tokens and the template's 5 after it; the last cut at 512
    assert text["hidden_states"].shape == (3, 512, 24) and text["mask"][:2].sum(1).tolist() == [10, 5]
    assert torch.equal(text["hidden_states"], embeds) and torch.equal(text["mask"], mask)

    pixels = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
    edit = QwenImageEditPipeline(**pipe.components, processor=None)  # its _encode_vae_image: the mean, normalised
    encoded = edit._encode_vae_image(pixels[:, :, None], None)[:, :, 0]
    assert torch.equal(family.encode_images(parts, pixels, None), encoded)
    ours = family.encode_images(parts, pixels, [torch.Generator().manual_seed(s) for s in (3, 4)])
    vae = pipe.vae
    drawn = torch.cat([vae.encode(pixels[i : i + 1, :, None]).latent_dist.sample(torch.Generator().manual_seed(s))
                       for i, s in enumerate((3, 4))])  # as QwenImageControlNetPipeline draws its control latents
    mean, std = (torch.tensor(getattr(vae.config, k)).view(1, 6, 1, 1, 1) for k in ("latents_mean", "latents_std"))
    assert ours.shape == (2, 6, 4, 6) and torch.allclose(ours, ((drawn - mean) * (1.0 / std))[:, :, 0], atol=1e-6)
    assert isinstance(vae.encode(pixels[:, :, None]).latent_dist, DiagonalGaussianDistribution)
    assert family.vae_scale_factor(parts) == pipe.vae_scale_factor == 4
    assert size_rule(family, str(other_qwenimage))[0] == 8  # the VAE's 4 x the 2x2 patches

    options = build_config(_run(other_qwenimage, Path("."), Path("."), kind="lora")).objective
    objective = family.objective(parts, options)
    assert isinstance(objective, FlowMatching)
    sigmas = np.linspace(1.0, 1 / 8, 8)
    config = pipe.scheduler.config  # the shift for 8x12 latents (24 tokens), as the pipeline computes it
    mu = calculate_shift(24, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
    pipe.scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    assert torch.allclose(objective.shift(torch.tensor(sigmas, dtype=torch.float32), 8, 12),
                          pipe.scheduler.sigmas[:-1], atol=1e-6)

    seen = _catch(pipe.transformer)  # one step of the pipeline, a batch whose prompts differ in length
    pipe([PROMPT, "green circle"], num_inference_steps=1, height=32, width=48, output_type="latent",
         generator=torch.Generator().manual_seed(0))
    assert seen["img_shapes"] == [[(1, 4, 6)]] * 2 and seen["encoder_hidden_states_mask"] is not None
    noisy = _unpack(seen["hidden_states"], 4, 6)
    with torch.no_grad():
        text = family.encode_prompts(parts, [PROMPT, "green circle"])
        ours = family.predict(parts, ModelInputs(noisy, seen["timestep"] * 1000, text))
    assert torch.equal(text["hidden_states"], seen["encoder_hidden_states"])
    assert torch.allclose(ours, _unpack(seen["output"], 4, 6), atol=1e-5)


def _randomised(net: QwenImageControlNetModel) -> QwenImageControlNetModel:
    """A ControlNet as if trained: its zero-initialised input and outputs made random."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in (net.controlnet_x_embedder, *net.controlnet_blocks):
            for parameter in module.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return net


def test_the_controlnet_sees_what_the_controlnet_pipeline_gives_it(tiny_qwenimage: Path, circles: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A step of QwenImageControlNetPipeline, its ControlNet's inputs and outputs caught,
    and the family's residuals for the same noisy latents, time and control image: equal
    (the pipeline's control latents drawn at the posterior's mean, as training takes them)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    family = get_family("qwenimage")
    config = build_config(_run(tiny_qwenimage, circles, Path("."), kind="controlnet", controlnet_double_blocks=1))
    parts = family.load(config.model)
    fresh = family.make_controlnet(parts, None, config.method)
    assert fresh.config.num_layers == 1
    text = family.encode_prompts(parts, [PROMPT, ""])
    inputs = ModelInputs(torch.randn(2, 5, 8, 8, generator=torch.Generator().manual_seed(0)),
                         torch.tensor([250.0, 900.0]), text)
    with torch.no_grad():  # a new ControlNet changes nothing until it trains
        residuals = family.controlnet_residuals(parts, fresh, inputs, torch.rand(2, 3, 64, 64))
        assert torch.equal(family.predict(parts, inputs), family.predict(parts, inputs.with_extra(**residuals)))

    net = _randomised(fresh)
    pipe = family.pipeline(parts.with_modules({"controlnet": net}))
    assert isinstance(pipe, QwenImageControlNetPipeline)
    pipe.set_progress_bar_config(disable=True)
    seen = _catch(net)
    control = Image.open(circles / "conditioning_images" / "000000.png").convert("RGB")
    with torch.no_grad():
        pipe(PROMPT, **family.control_arguments(control), num_inference_steps=2, height=64, width=64,
             generator=torch.Generator().manual_seed(0), output_type="latent", **family.generation_options(pipe))
        text = family.encode_prompts(parts, [PROMPT])
        inputs = ModelInputs(_unpack(seen["hidden_states"], 4, 4), seen["timestep"] * 1000, text)
        ours = family.controlnet_residuals(parts, net, inputs, _pixels(control)[None])["controlnet_block_samples"]
    assert len(ours) == 1 and torch.allclose(ours[0], seen["output"][0], atol=1e-5) and ours[0].abs().max() > 1e-3


def test_the_base_and_the_method_are_checked_before_anything_loads(tiny_qwenimage: Path, tiny_edit: Path,
                                                                   tiny_edit_plus: Path, circles: Path) -> None:
    from difftune.training.source_checks import check_sources

    assert family_of_pipeline(tiny_qwenimage).name == "qwenimage"
    assert family_of_pipeline(tiny_edit).name == family_of_pipeline(tiny_edit_plus).name == "qwenimage_edit"
    for method, problem in (({"controlnet_single_blocks": 2}, "dual-stream blocks only"),
                            ({"controlnet_double_blocks": 3}, "has 2 blocks")):
        with pytest.raises(ConfigError, match=problem):
            check_sources(build_config(_run(tiny_qwenimage, circles, Path("."), kind="controlnet", **method)))
    with pytest.raises(Exception, match="family 'qwenimage_edit'"):
        check_sources(build_config(_run(tiny_edit, circles, Path("."), kind="lora")))
    check_sources(build_config(_run(tiny_edit, circles, Path("."), "qwenimage_edit", kind="lora")))


# --- Qwen-Image runs whose results diffusers loads ------------------------------------------


def test_a_lora_run_loads_into_the_pipeline_and_changes_it(tiny_qwenimage: Path, circles: Path,
                                                           tmp_path: Path) -> None:
    final = train(build_config(_run(tiny_qwenimage, circles, tmp_path / "run", kind="lora")))
    assert (tmp_path / "run" / "validation" / "step-000002" / "pair-00-grid.png").is_file()
    pipe = _pipeline(QwenImagePipeline, tiny_qwenimage)
    before = _image(pipe)
    pipe.load_lora_weights(final)
    assert not np.allclose(before, _image(pipe), atol=1e-4), "the LoRA changed nothing"
    assert np.allclose(before, _image(pipe, attention_kwargs={"scale": 0.0}), atol=1e-5)


def test_a_full_run_saves_a_pipeline_that_loads(tiny_qwenimage: Path, circles: Path, tmp_path: Path) -> None:
    final = train(build_config(_run(tiny_qwenimage, circles, tmp_path / "run", kind="full")))
    pipe = _pipeline(QwenImagePipeline, final)
    trained = pipe.transformer.state_dict()
    base = QwenImageTransformer2DModel.from_pretrained(tiny_qwenimage, subfolder="transformer").state_dict()
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    assert np.isfinite(_image(pipe)).all()


def test_a_guidance_distilled_base_is_refused_where_diffusers_cannot_run_it(tiny_qwenimage: Path, circles: Path,
                                                                            tmp_path: Path) -> None:
    """A transformer with guidance_embeds: where diffusers' Qwen-Image time embedding takes
    no guidance (0.42), the transformer and QwenImagePipeline fail on it, so the run is
    refused before anything loads; where it does, training gives it `[model] guidance` and
    validation gives the pipeline guidance_scale without a true-CFG pass."""
    import shutil

    from difftune.families.qwenimage.family import runs_guidance_embeds
    from difftune.training.source_checks import check_sources

    base = tmp_path / "distilled"
    shutil.copytree(tiny_qwenimage, base)
    config_file = base / "transformer" / "config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"guidance_embeds": True}))
    raw = _run(base, circles, tmp_path / "run", kind="lora", lora={"rank": 4})
    raw["model"]["guidance"] = 2.0
    raw["validation"] |= {"guidance_scale": 2.0, "num_images": 1}
    pipe = _pipeline(QwenImagePipeline, base)
    family = get_family("qwenimage")
    assert family.guidance_arguments(pipe, 2.0, 1) == {"guidance_scale": 2.0, "true_cfg_scale": 1.0}
    if not runs_guidance_embeds():
        with pytest.raises(TypeError):  # what diffusers does with it: why the run is refused
            _image(pipe, guidance_scale=2.0)
        with pytest.raises(ConfigError, match="guidance_embeds = true, and diffusers .* cannot run one"):
            check_sources(build_config(raw))
        return
    seen = _catch(pipe.transformer)
    _image(pipe, guidance_scale=2.0)
    assert seen["guidance"] is not None
    train(build_config(raw))
    assert (tmp_path / "run" / "validation" / "step-000002" / "pair-00-image-0.png").is_file()


def test_a_controlnet_run_loads_into_the_controlnet_pipeline(tiny_qwenimage: Path, circles: Path,
                                                             tmp_path: Path) -> None:
    final = train(build_config(_run(tiny_qwenimage, circles, tmp_path / "run", kind="controlnet")))
    net = QwenImageControlNetModel.from_pretrained(final)
    pipe = _pipeline(QwenImageControlNetPipeline, tiny_qwenimage, controlnet=net)
    control = Image.open(circles / "conditioning_images" / "000000.png").convert("RGB")
    assert _image(pipe, control_image=control).shape == (64, 64, 3)


# --- Qwen-Image-Edit ----------------------------------------------------------------------


def _reference(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A random image at the size the edit pipelines encode it (about a megapixel)."""
    family = get_family("qwenimage_edit")
    width, height = family.reference_size(size, (64, 64))
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8))


def test_instructions_are_encoded_with_their_references_as_the_edit_pipelines_do(tiny_edit: Path,
                                                                                 tiny_edit_plus: Path) -> None:
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE, calculate_dimensions

    family = get_family("qwenimage_edit")
    first, second = _reference(0), _reference(1, (40, 72))
    assert first.size == (1184, 896) and second.size == (768, 1376)
    parts = _load(tiny_edit, "qwenimage_edit")
    pipe = _pipeline(QwenImageEditPipeline, tiny_edit, processor=load_processor(tiny_edit))
    # a batch of an edit and a text-to-image row: each as its pipeline encodes it, padded to the longest
    text = family.encode_edit_prompts(parts, [PROMPT, "green circle"], [[_pixels(first)], []])
    embeds, mask = pipe.encode_prompt(PROMPT, image=first, device="cpu")
    plain, _ = QwenImagePipeline(**{k: v for k, v in pipe.components.items() if k != "processor"}).encode_prompt(
        "green circle", device="cpu")
    assert mask is None and text["mask"].sum(1).tolist() == [embeds.shape[1], plain.shape[1]]
    assert torch.equal(text["hidden_states"][:1], embeds)
    assert torch.equal(text["hidden_states"][1, : plain.shape[1]], plain[0])

    def plus_encoding(pipeline, images: list[Image.Image]) -> torch.Tensor:  # its images as its __call__ sizes them
        sizes = [calculate_dimensions(CONDITION_IMAGE_SIZE, image.width / image.height) for image in images]
        shown = [pipeline.image_processor.resize(image, h, w) for image, (w, h) in zip(images, sizes)]
        return pipeline.encode_prompt(PROMPT, image=shown, device="cpu")[0]

    # a row of two references on an Edit base is encoded as Edit Plus, a row of one as Edit;
    # any row on an Edit Plus base as Edit Plus
    rows = family.encode_edit_prompts(parts, [PROMPT, PROMPT], [[_pixels(first)], [_pixels(first), _pixels(second)]])
    two = plus_encoding(QwenImageEditPlusPipeline(**pipe.components), [first, second])
    assert rows["mask"].sum(1).tolist() == [embeds.shape[1], two.shape[1]]
    assert torch.equal(rows["hidden_states"][0, : embeds.shape[1]], embeds[0])
    assert torch.equal(rows["hidden_states"][1:], two)
    plus_parts = _load(tiny_edit_plus, "qwenimage_edit")
    plus = _pipeline(QwenImageEditPlusPipeline, tiny_edit_plus, processor=load_processor(tiny_edit_plus))
    one = family.encode_edit_prompts(plus_parts, [PROMPT], [[_pixels(first)]])
    assert torch.equal(one["hidden_states"], plus_encoding(plus, [first]))
    assert family.max_references(str(tiny_edit)) == 1 and family.max_references(str(tiny_edit_plus)) is None


def test_the_references_join_the_transformer_call_as_the_edit_pipeline_joins_them(tiny_edit: Path) -> None:
    family = get_family("qwenimage_edit")
    parts = _load(tiny_edit, "qwenimage_edit")
    pipe = family.pipeline(parts, "edit")
    assert isinstance(pipe, QwenImageEditPipeline)
    pipe.set_progress_bar_config(disable=True)
    seen = _catch(pipe.transformer)
    reference = _reference(0)
    with torch.no_grad():
        pipe(prompt=PROMPT, num_inference_steps=2, output_type="latent",
             generator=torch.Generator().manual_seed(0), **family.edit_arguments(reference, 64, 32))
    # the target 64x32 (2x1 patches of the VAE's 16), the reference 1184x896 (37x28)
    assert seen["img_shapes"] == [[(1, 1, 2), (1, 28, 37)]]
    noisy, packed = _unpack(seen["hidden_states"][:, :2], 1, 2), seen["hidden_states"][:, 2:]
    with torch.no_grad():
        latents = family.encode_images(parts, _pixels(reference)[None] * 2 - 1, None)
        assert torch.allclose(_unpack(packed, 28, 37), latents, atol=1e-5)  # the reference's latents, as encoded here
        text = family.encode_edit_prompts(parts, [PROMPT], [[_pixels(reference)]])
        inputs = ModelInputs(noisy, seen["timestep"] * 1000, text)
        ours = family.predict(parts, inputs.with_extra(references=[[latents[0]]]))
        assert torch.allclose(ours, _unpack(seen["output"][:, :2], 1, 2), atol=1e-5)
        # a batch whose rows differ (one without a reference): each row as it runs alone
        pair = ModelInputs(noisy.repeat(2, 1, 1, 1), inputs.timesteps.repeat(2),
                           family.encode_edit_prompts(parts, [PROMPT, PROMPT], [[_pixels(reference)], []]))
        both = family.predict(parts, pair.with_extra(references=[[latents[0]], []]))
        alone = family.predict(parts, ModelInputs(noisy, inputs.timesteps, family.encode_prompts(parts, [PROMPT])))
    assert torch.allclose(both[:1], ours, atol=1e-5) and torch.allclose(both[1:], alone, atol=1e-5)


def test_the_edit_pipelines_run_on_the_tiny_bases(tiny_edit: Path, tiny_edit_plus: Path) -> None:
    family = get_family("qwenimage_edit")
    references = [_reference(0), _reference(1, (40, 72))]
    edit = family.load_pipeline(str(tiny_edit), torch.float32, kind="edit")
    plus = family.load_pipeline(str(tiny_edit_plus), torch.float32, kind="edit")
    assert type(edit) is QwenImageEditPipeline and type(plus) is QwenImageEditPlusPipeline
    for pipe, shown in ((edit, references[0]), (plus, references)):  # Plus: one prompt's references
        pipe.set_progress_bar_config(disable=True)
        image = pipe(prompt=PROMPT, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0),
                     **family.edit_arguments(shown, 64, 64)).images[0]
        assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def _edits(folder: Path) -> Path:
    """Four edits (a disc recoloured; the instruction names the new colour), the last row
    without a reference (it trains as text-to-image)."""
    from PIL import ImageDraw

    folder.mkdir(parents=True)
    lines = []
    for row, (old, new) in enumerate((("red", "blue"), ("blue", "green"), ("green", "red"), ("red", "green"))):
        for name, colour in ((f"target-{row}.png", new), (f"reference-{row}.png", old)):
            image = Image.new("RGB", (64, 64), "white")
            ImageDraw.Draw(image).ellipse((8 + 4 * row, 10, 40 + 4 * row, 42), fill=colour)
            image.save(folder / name)
        reference = None if row == 3 else f"reference-{row}.png"
        lines.append(f'{{"file_name": "target-{row}.png", "reference_image": {json.dumps(reference)}, '
                     f'"text": "make the circle {new}"}}')
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_an_edit_lora_run_loads_into_the_edit_pipeline_and_changes_the_edit(tiny_edit: Path, tmp_path: Path) -> None:
    data = _edits(tmp_path / "edits")
    raw = _run(tiny_edit, data, tmp_path / "run", "qwenimage_edit", kind="edit", lora={"rank": 4})
    raw["validation"] |= {"prompts": ["make the circle red"], "images": [str(data / "reference-1.png")]}
    final = train(build_config(raw))
    assert (tmp_path / "run" / "validation" / "step-000002" / "pair-00-grid.png").is_file()
    pipe = _pipeline(QwenImageEditPipeline, tiny_edit, processor=load_processor(tiny_edit))
    reference = Image.open(data / "reference-1.png").convert("RGB")
    call = get_family("qwenimage_edit").edit_arguments(reference, None, None)  # the size: _image's
    before = _image(pipe, **call)
    pipe.load_lora_weights(final)
    assert not np.allclose(before, _image(pipe, **call), atol=1e-4), "the LoRA changed nothing"



def test_a_validation_prompt_with_several_references_shows_them_and_their_edit(
        tiny_edit: Path, tiny_edit_plus: Path, tiny_qwenimage: Path, tmp_path: Path) -> None:
    data = _edits(tmp_path / "edits")
    several = [str(data / "reference-0.png"), str(data / "reference-1.png")]
    raw = _run(tiny_edit_plus, data, tmp_path / "run", "qwenimage_edit", kind="edit", lora={"rank": 4})
    raw["validation"] |= {"prompts": ["make the circle red"], "images": [several], "num_images": 1}
    # the edit (32 px) and its references (64 px, kept at their size) in one tensorboard stack
    raw["data"]["resolution"] = 32
    raw["train"]["report_to"] = "tensorboard"
    train(build_config(raw))
    grid = Image.open(tmp_path / "run" / "validation" / "step-000002" / "pair-00-grid.png")
    image = Image.open(tmp_path / "run" / "validation" / "step-000002" / "pair-00-image-0.png")
    assert grid.width >= 3 * 64 and image.size == (32, 32)  # both references, then the edit, at their size
    prompts = json.loads((tmp_path / "run" / "validation" / "step-000002" / "prompts.json").read_text())
    assert prompts["pair-00"]["image"] == several
    # QwenImageEditPipeline takes one reference per prompt: refused before any model loads
    raw = _run(tiny_edit, data, tmp_path / "one", "qwenimage_edit", kind="edit", lora={"rank": 4})
    raw["validation"] |= {"prompts": ["make the circle red"], "images": [several]}
    with pytest.raises(DataError, match=r"validation.images\[0\] lists 2 references, and QwenImageEditPipeline"):
        train(build_config(raw))
    assert not (tmp_path / "one" / "checkpoints").exists()
    # and a method without references takes one conditioning image per prompt
    raw = _run(tiny_qwenimage, data, tmp_path / "cn", kind="controlnet")
    raw["validation"] |= {"images": [several]}
    with pytest.raises(ConfigError, match=r"validation.images\[0\]: a list of images is an edit's several"):
        build_config(raw)


def test_validation_keeps_an_edits_references_at_their_size_for_the_pipeline_to_size(tiny_edit: Path,
                                                                                     tmp_path: Path) -> None:
    """Training resizes a reference as QwenImageEditPipeline does (to about a megapixel,
    Lanczos), so validation and the metric hand the pipeline the reference as it is."""
    from difftune.scoring import load_metric_set
    from difftune.training.setup import preflight

    data = _edits(tmp_path / "edits")
    raw = _run(tiny_edit, data, tmp_path / "run", "qwenimage_edit", kind="edit", lora={"rank": 4})
    raw["validation"] |= {"prompts": ["make the circle red"], "images": [str(data / "reference-1.png")],
                          "metric": "fill_circles_edit", "metric_data": str(data), "metric_samples": 2}
    raw["data"]["resolution"] = 32
    config = build_config(raw)
    metric_set = load_metric_set(config)
    assert [image.size for image in metric_set.conditionings] == [(64, 64), (64, 64)]
    (pair,) = preflight(config).validation_pairs
    assert pair.image.size == (64, 64)


def _cached_and_not(raw: dict, tmp_path: Path) -> tuple[dict, dict, dict]:
    """The run from the text cache and without it: (LoRA weights, losses) each, and the
    cached run's cache event."""
    from safetensors.torch import load_file

    from difftune.training.events import read_events

    finals, losses = {}, {}
    for cached in (False, True):
        raw["train"]["output_dir"] = str(tmp_path / f"run-{cached}")
        raw["data"] |= {"cache_text": cached, "encoded_cache_dir": str(tmp_path / "cache")}
        finals[cached] = load_file(train(build_config(raw)) / "pytorch_lora_weights.safetensors")
        events = read_events(tmp_path / f"run-{cached}")
        losses[cached] = [event["loss"] for event in events if event["event"] == "step"]
    assert max(abs(a - b) for a, b in zip(losses[False], losses[True])) < 1e-5
    assert all(torch.allclose(finals[False][k], finals[True][k], atol=1e-5) for k in finals[False])
    return finals, losses, [e for e in read_events(tmp_path / "run-True") if e["event"] == "cache"][-1]


def test_prompts_of_different_lengths_train_from_the_text_cache_as_without(tiny_qwenimage: Path, circles: Path,
                                                                           tmp_path: Path) -> None:
    """Each prompt is cached unpadded and padded per batch as the encoder pads it: with ""
    (the template alone) beside captions in a batch, the run is the uncached one."""
    raw = _run(tiny_qwenimage, circles, tmp_path / "run", kind="lora", lora={"rank": 4})
    raw["train"] |= {"batch_size": 3, "max_steps": 3}
    raw["data"] |= {"proportion_empty_prompts": 0.4, "cache_latents": False}
    raw["validation"] = {"every": 100}
    _, _, stats = _cached_and_not(raw, tmp_path)
    captions = {json.loads(line)["text"] for line in (circles / "metadata.jsonl").read_text().splitlines()}
    assert stats["texts_encoded"] == len(captions | {""})


def test_instructions_train_from_the_text_cache_each_with_its_rows_references(tiny_edit: Path,
                                                                               tmp_path: Path) -> None:
    """The instruction's encoding sees the row's reference, so the cache keeps one per row and
    caption (a row without a reference as text-to-image); a batch of all four trains as
    without the cache, and a second run reads every entry back. A flipped reference is not
    what the cache holds: cache_text = true is refused then."""
    data = _edits(tmp_path / "edits")
    raw = _run(tiny_edit, data, tmp_path / "run", "qwenimage_edit", kind="edit", lora={"rank": 4})
    raw["train"] |= {"batch_size": 4, "max_steps": 1, "checkpoint_every": 1}  # (a megapixel reference each: slow)
    raw["data"] |= {"proportion_empty_prompts": 0.5, "cache_latents": False}
    raw["validation"] = {"every": 100}
    _, _, stats = _cached_and_not(raw, tmp_path)
    assert stats["texts_encoded"] == 8  # 4 rows, each its instruction and ""
    raw["train"]["output_dir"] = str(tmp_path / "again")
    train(build_config(raw))
    from difftune.training.events import read_events

    again = [e for e in read_events(tmp_path / "again") if e["event"] == "cache"][-1]
    assert (again["texts_encoded"], again["texts_reused"]) == (0, 8)
    raw["data"]["random_flip"] = True
    raw["train"]["output_dir"] = str(tmp_path / "flipped")
    with pytest.raises(ConfigError, match="data.cache_text = true: family 'qwenimage_edit' encodes each instruction "
                                          "with its reference images, which data.random_flip flips"):
        train(build_config(raw))
