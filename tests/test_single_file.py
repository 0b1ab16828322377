"""Single-file (CompVis/LDM layout) export, read back by diffusers' own from_single_file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from safetensors.torch import load_file, save_file

from difftune.families.sd import single_file
from difftune.families.sd.single_file import export_single_file, single_file_state_dict

COMPONENTS = ("unet", "vae", "text_encoder")
NO_SAFETY = {"safety_checker": None, "requires_safety_checker": False}


def configs_only(folder: Path, dest: Path) -> Path:
    """The pipeline's configs and tokenizer without any weights.

    from_single_file quietly falls back to from_pretrained(config) for a component whose
    keys it does not recognise in the file; with no weights here that fallback fails
    loudly, so a passing round trip proves every weight came from the single file.
    """
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return dest


def load_single(file: Path, config: Path) -> StableDiffusionPipeline:
    # A local diffusers folder as config needs no original_config and no Hub access.
    return StableDiffusionPipeline.from_single_file(str(file), config=str(config), **NO_SAFETY)


def assert_same_weights(expected: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    got = model.state_dict()
    assert got.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, different[:5]


def two_step_images(pipe: StableDiffusionPipeline) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(
        "red circle",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=generator,
        output_type="np",
    ).images


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Toy-sized tensors gain nothing from threads, and on a shared 2-core machine OpenMP's
    spin-waiting made these tests ~50x slower (0.2 s -> 11 s) whenever another process ran."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exported(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_single_file(tiny_base, tmp_path_factory.mktemp("single") / "tiny.safetensors")


def test_round_trip_is_exact(tiny_base: Path, exported: Path, tmp_path: Path) -> None:
    state = load_file(str(exported))
    assert {k.split(".")[0] for k in state} == {"model", "first_stage_model", "cond_stage_model"}
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in state
    # Layout facts diffusers' reader tolerates either way but LDM code does not:
    # an upsampler after an attention sits at .2, and VAE attention weights are 1x1 convs.
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in state
    assert state["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4
    assert [p.name for p in exported.parent.iterdir()] == ["tiny.safetensors"]  # no temp file left

    folder = StableDiffusionPipeline.from_pretrained(tiny_base, **NO_SAFETY)
    single = load_single(exported, configs_only(tiny_base, tmp_path / "configs"))
    for name in COMPONENTS:
        assert_same_weights(getattr(folder, name).state_dict(), getattr(single, name))
    assert np.array_equal(two_step_images(folder), two_step_images(single))


def test_half_is_fp16_and_half_size(tiny_base: Path, exported: Path, tmp_path: Path) -> None:
    half = export_single_file(tiny_base, tmp_path / "half.safetensors", half=True)
    full_state, half_state = load_file(str(exported)), load_file(str(half))
    assert half_state.keys() == full_state.keys()
    assert {v.dtype for v in half_state.values()} == {torch.float16}
    assert all(torch.equal(half_state[k], v.half()) for k, v in full_state.items())
    ratio = half.stat().st_size / exported.stat().st_size
    assert 0.4 < ratio < 0.6, ratio


def make_sd2_variant(tiny_base: Path, dest: Path) -> Path:
    """tiny_base with SD2 traits: OpenCLIP-style text encoder (gelu) and an SD2-style UNet.

    The UNet also varies the shape the mapping must follow: attention in the first block
    rather than the last, one layer per block, linear projections, per-block head dims
    and two transformer layers per attention. The text encoder's keys are rewritten the way
    transformers 4.x named them (text_model. prefix, position_ids) to cover the legacy key
    names (in safetensors: a pickled .bin is refused, tests/test_export_trust.py).
    """
    shutil.copytree(tiny_base, dest)
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        upcast_attention=True,
        transformer_layers_per_block=2,
        norm_num_groups=1,
    )
    shutil.rmtree(dest / "unet")
    unet.save_pretrained(dest / "unet")
    text = dest / "text_encoder"
    config = json.loads((text / "config.json").read_text())
    (text / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    weights = load_file(str(text / "model.safetensors"))
    legacy = {f"text_model.{k}": v for k, v in weights.items()}
    positions = torch.arange(config["max_position_embeddings"])[None]
    legacy["text_model.embeddings.position_ids"] = positions
    save_file(legacy, str(text / "model.safetensors"))
    return dest


def test_sd2_open_clip_layout_round_trips(tiny_base: Path, tmp_path: Path) -> None:
    variant = make_sd2_variant(tiny_base, tmp_path / "sd2")
    file = export_single_file(variant, tmp_path / "sd2.safetensors")
    state = load_file(str(file))
    assert not any(k.startswith("cond_stage_model.transformer.") for k in state)
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in state  # no attention before it
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.1.attn2.to_k.weight" in state
    legacy = load_file(str(variant / "text_encoder" / "model.safetensors"))
    source = {k.removeprefix("text_model."): v for k, v in legacy.items()}
    layer = "encoder.layers.1.self_attn"
    fused = state["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(fused, torch.cat([source[f"{layer}.{p}_proj.weight"] for p in "qkv"]))

    folder = StableDiffusionPipeline.from_pretrained(variant, **NO_SAFETY)
    single = load_single(file, configs_only(variant, tmp_path / "configs"))
    assert single.text_encoder.config.hidden_act == "gelu"
    for name in COMPONENTS:
        assert_same_weights(getattr(folder, name).state_dict(), getattr(single, name))
    assert np.array_equal(two_step_images(folder), two_step_images(single))


def test_missing_component_is_named(tiny_base: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(tiny_base, tmp_path / "no-vae")
    shutil.rmtree(broken / "vae")
    with pytest.raises(ValueError, match="no-vae/vae"):
        export_single_file(broken, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    (broken / "vae").mkdir()
    (broken / "vae" / "config.json").write_text((tiny_base / "vae" / "config.json").read_text())
    with pytest.raises(ValueError, match="no weight file in .*no-vae/vae"):
        single_file_state_dict(broken)


def test_unmapped_key_is_named(tiny_base: Path, tmp_path: Path) -> None:
    """A weight with no LDM name (here an LCM-style cond_proj) is an error, not a silent drop."""
    extra = shutil.copytree(tiny_base, tmp_path / "extra")
    weights = extra / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["time_embedding.cond_proj.weight"] = torch.zeros(16, 4)
    save_file(state, str(weights))
    with pytest.raises(ValueError, match="time_embedding.cond_proj.weight"):
        single_file_state_dict(extra)


@pytest.mark.parametrize(
    "unet_kwargs",
    [
        {"cross_attention_dim": 768, "attention_head_dim": 8},  # SD 1.5
        {
            "cross_attention_dim": 1024,
            "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True,
        },  # SD 2.1
    ],
)
def test_full_size_layout_matches_diffusers_reader(unet_kwargs: dict) -> None:
    """Real SD shapes (4 blocks x 2 layers, 12 input blocks) on the meta device, so no weights.

    The tiny models never reach two-digit block numbers, where a prefix slip
    (input_blocks.1 vs input_blocks.11) would show; 686 and 248 are the UNet and VAE key
    counts of the released SD checkpoints.
    """
    with init_empty_weights():
        unet = UNet2DConditionModel(**unet_kwargs)
        vae = AutoencoderKL(
            block_out_channels=[128, 256, 512, 512],
            layers_per_block=2,
            latent_channels=4,
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
        )
    for model, rules, prefix, reader, count in [
        (unet, single_file.unet_rules, single_file.UNET_PREFIX, convert_ldm_unet_checkpoint, 686),
        (vae, single_file.vae_rules, single_file.VAE_PREFIX, convert_ldm_vae_checkpoint, 248),
    ]:
        config, state = dict(model.config), model.state_dict()
        ldm = single_file.apply_rules(state, rules(config), prefix, Path(type(model).__name__))
        back = reader(ldm, config)
        assert len(ldm) == count
        assert back.keys() == state.keys()
        assert all(back[k].shape == state[k].shape for k in state)
