"""SDXL single-file (SGM layout) export, read back by diffusers' own from_single_file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from difftune.families.sdxl import single_file as sdxl
from difftune.families.sdxl.single_file import export_sdxl_single_file, sdxl_single_file_state_dict
from difftune.tiny import write_word_tokenizer

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
NO_WATERMARK = {"add_watermarker": False}  # invisible-watermark, where installed, alters images
WIDTHS = {"clip": 32, "open_clip": 48, "projection": 40}  # projection != width: catches a .T slip
TIME_DIM = 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """As in test_single_file.py: OpenMP threads on toy tensors only slow a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def text_encoder(cls: type, width: int, act: str, vocab: int, **config) -> CLIPTextModel:
    config = {"num_hidden_layers": 3, "num_attention_heads": 4, **config}
    return cls(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=width,
            intermediate_size=4 * width,
            vocab_size=vocab,
            hidden_act=act,
            **config,
        )
    )


def tiny_unet() -> UNet2DConditionModel:
    """SDXL's shape in small: no attention in the first block, transformer depth growing with
    depth (here 1/2/3, SDXL's is -/2/10), pooled text + 6 size numbers into label_emb."""
    return UNet2DConditionModel(
        block_out_channels=(4, 8, 8),
        layers_per_block=2,
        sample_size=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2, 3),
        cross_attention_dim=WIDTHS["clip"] + WIDTHS["open_clip"],
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=WIDTHS["projection"] + 6 * TIME_DIM,
        norm_num_groups=1,
    )


def build_tiny_sdxl(out: Path) -> Path:
    tokenizer = write_word_tokenizer(out.parent / "vocab", ["red", "circle"])
    vocab = len(tokenizer)
    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(
            block_out_channels=[4, 8],
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            latent_channels=4,
            norm_num_groups=2,
            scaling_factor=0.13025,
        ),
        text_encoder=text_encoder(CLIPTextModel, WIDTHS["clip"], "quick_gelu", vocab),
        text_encoder_2=text_encoder(
            CLIPTextModelWithProjection,
            WIDTHS["open_clip"],
            "gelu",
            vocab,
            projection_dim=WIDTHS["projection"],
        ),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=tiny_unet(),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        ),
        **NO_WATERMARK,
    )
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


@pytest.fixture(scope="module")
def exported(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "tiny-sdxl.safetensors"
    return export_sdxl_single_file(tiny_sdxl, out)


def configs_only(folder: Path, dest: Path) -> Path:
    """Configs and tokenizers, no weights: a component from_single_file failed to find in the
    file would fall back to from_pretrained here and fail loudly, not load quietly."""
    return shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))


def load_single(file: Path, config: Path, **kwargs) -> StableDiffusionXLPipeline:
    # A local diffusers folder as config= needs no original_config and no Hub access.
    return StableDiffusionXLPipeline.from_single_file(
        str(file), config=str(config), local_files_only=True, **NO_WATERMARK, **kwargs
    )


def assert_same_weights(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, different[:5]


def two_step_images(pipe: StableDiffusionXLPipeline) -> np.ndarray:
    """Each weight first copied into fresh memory: a weight mmapped from a safetensors file may
    sit at an unaligned address, and CPU matmul kernels round differently there (seen: equal
    text_projection weights, 3e-7 apart in text_embeds). Same bits, same address rules."""
    for name in COMPONENTS:
        for param in getattr(pipe, name).parameters():
            param.data = param.data.clone()
    generator = torch.Generator().manual_seed(0)
    return pipe(
        "red circle",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=generator,
        output_type="np",
    ).images


def test_round_trip_is_exact(tiny_sdxl: Path, exported: Path, tmp_path: Path) -> None:
    state = load_file(str(exported))
    assert {k.split(".")[0] for k in state} == {"model", "first_stage_model", "conditioner"}
    unet = "model.diffusion_model."
    assert f"{unet}label_emb.0.2.weight" in state
    assert f"{unet}input_blocks.7.1.transformer_blocks.2.attn2.to_k.weight" in state  # depth 3
    assert f"{unet}middle_block.1.transformer_blocks.2.attn1.to_q.weight" in state
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in state
    projection = state["conditioner.embedders.1.model.text_projection"]
    assert projection.shape == (WIDTHS["open_clip"], WIDTHS["projection"])  # OpenCLIP's x @ P
    assert [p.name for p in exported.parent.iterdir()] == [exported.name]  # no temp file left

    folder = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, **NO_WATERMARK)
    single = load_single(exported, configs_only(tiny_sdxl, tmp_path / "configs"))
    for name in COMPONENTS:
        assert_same_weights(getattr(folder, name).state_dict(), getattr(single, name).state_dict())
    assert np.array_equal(two_step_images(folder), two_step_images(single))


def test_half_reads_back_as_fp16_rounding(tiny_sdxl: Path, exported: Path, tmp_path: Path) -> None:
    half = export_sdxl_single_file(tiny_sdxl, tmp_path / "half.safetensors", half=True)
    full_state, half_state = load_file(str(exported)), load_file(str(half))
    assert half_state.keys() == full_state.keys()
    assert {v.dtype for v in half_state.values()} == {torch.float16}
    folder = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, **NO_WATERMARK)
    single = load_single(
        half, configs_only(tiny_sdxl, tmp_path / "configs"), torch_dtype=torch.float16
    )
    for name in COMPONENTS:
        expected = {k: v.half() for k, v in getattr(folder, name).state_dict().items()}
        assert_same_weights(expected, getattr(single, name).state_dict())


def variant(tiny_sdxl: Path, dest: Path, component: str, **config: object) -> Path:
    """A copy of the tiny SDXL folder with some of one component's config.json replaced."""
    shutil.copytree(tiny_sdxl, dest)
    path = dest / component / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return dest


@pytest.mark.parametrize(
    "component, weights, key",
    [
        ("unet", "diffusion_pytorch_model.safetensors", "encoder_hid_proj.weight"),
        ("text_encoder_2", "model.safetensors", "text_projection.bias"),
    ],
)
def test_extra_weight_is_named(
    tiny_sdxl: Path, tmp_path: Path, component: str, weights: str, key: str
) -> None:
    folder = variant(tiny_sdxl, tmp_path / "extra", component)
    path = folder / component / weights
    save_file({**load_file(str(path)), key: torch.zeros(4)}, str(path))
    with pytest.raises(ValueError, match=f"{component}: 1 diffusers keys .*{key}"):
        export_sdxl_single_file(folder, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize(
    "component, config, message",
    [
        (
            "unet",
            {"down_block_types": ["ResnetDownsampleBlock2D"] + ["CrossAttnDownBlock2D"] * 2},
            "block types \\['ResnetDownsampleBlock2D'\\]",
        ),
        ("unet", {"addition_embed_type": None}, "addition_embed_type=None"),
        (
            "unet",
            {"transformer_layers_per_block": [1, 1, 3]},
            "down_blocks.1.attentions.0: 1 in config.json, 2 in the weights",
        ),
        ("text_encoder_2", {"hidden_size": WIDTHS["clip"]}, "both have hidden_size=32"),
    ],
)
def test_unsupported_folder_is_named(
    tiny_sdxl: Path, tmp_path: Path, component: str, config: dict, message: str
) -> None:
    folder = variant(tiny_sdxl, tmp_path / "odd", component, **config)
    with pytest.raises(ValueError, match=message):
        sdxl_single_file_state_dict(folder)


def test_missing_projection_is_named(tiny_sdxl: Path, tmp_path: Path) -> None:
    folder = variant(tiny_sdxl, tmp_path / "no-projection", "text_encoder_2")
    path = folder / "text_encoder_2" / "model.safetensors"
    state = load_file(str(path))
    del state["text_projection.weight"]
    save_file(state, str(path))
    with pytest.raises(ValueError, match="no-projection/text_encoder_2: no text_projection"):
        sdxl_single_file_state_dict(folder)


def test_full_size_layout_matches_diffusers_reader() -> None:
    """SDXL base's real shapes on the meta device (no weights): depth 10 attentions, the
    2816-wide added condition, and a 32-layer bigG encoder whose resblocks.9 is what
    diffusers looks for to call a file SDXL when no config is given. 1680 is the UNet key
    count of the released sd_xl_base_1.0 checkpoint."""
    with init_empty_weights():
        unet = UNet2DConditionModel(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        big = text_encoder(
            CLIPTextModelWithProjection,
            1280,
            "gelu",
            49408,
            projection_dim=1280,
            num_hidden_layers=32,
            num_attention_heads=20,
        )
    config, state = dict(unet.config), unet.state_dict()
    sdxl.check_depths(config, state, Path("unet"))
    ldm = sdxl.apply_rules(state, sdxl.sdxl_unet_rules(config), sdxl.UNET_PREFIX, Path("unet"))
    assert len(ldm) == 1680
    back = convert_ldm_unet_checkpoint(ldm, config)
    assert back.keys() == state.keys()
    assert all(back[k].shape == state[k].shape for k in state)

    text_state = big.state_dict()
    text = sdxl.projected_open_clip_state(text_state, Path("text_encoder_2"))
    assert infer_diffusers_model_type({**ldm, **text}) == "xl_base"
    back = convert_open_clip_checkpoint(big, text, prefix=sdxl.OPEN_CLIP_PREFIX)
    assert back.keys() == text_state.keys()
    assert all(back[k].shape == text_state[k].shape for k in text_state)
