"""Every limit at config load, before any model loads: sizes the base's VAE, denoiser
and pipelines can take (read from its configs), ControlNet depths its transformer has,
a base of another family (or of none), flags a family's pipeline would ignore, what a
sharded launch cannot train, and exports that have no such format. Each refusal is one
sentence naming the key or flag, raised while no weight has been read."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import WORDS, run_config

from difftune.cli import main
from difftune.config import ConfigError, build_config
from difftune.families.latent import LatentFamily
from difftune.paths import PathError
from difftune.families.cogview4.tiny import build_tiny_cogview4
from difftune.families.flux.tiny import build_tiny_flux

CONTROL = "conditioning_images/000000.png"


@pytest.fixture(scope="module")
def cogview4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_cogview4(tmp_path_factory.mktemp("cogview4") / "tiny-cogview4", WORDS, seed=0)


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny-flux", WORDS, seed=0)


@pytest.fixture
def nothing_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any model or pipeline load fails the test: each refusal must come first."""
    def loaded(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(LatentFamily, "load_parts", loaded)
    monkeypatch.setattr(LatentFamily, "load_pipeline", loaded)


def _edited(base: Path, where: Path, file: str, **values: object) -> Path:
    """A copy of a tiny base with keys of one of its JSON configs changed."""
    copy = where / base.name
    shutil.copytree(base, copy)
    config = json.loads((copy / file).read_text())
    (copy / file).write_text(json.dumps(config | values))
    return copy


def _train(raw: dict) -> None:
    from difftune.training.loop import train

    train(build_config(raw))


# --- sizes -----------------------------------------------------------------------------


@pytest.mark.parametrize(("patch", "resolution", "why"), [
    (8, 88, r"must be a multiple of 16 \(the VAE factor 2 x the transformer's 8x8 patches "
            r"\(transformer/config.json patch_size\), from the base's configs\); 80 or 96 would do"),
    (2, 72, r"must be a multiple of 16 \(the VAE factor 2 x the transformer's 2x2 patches .*, and "
            r"CogView4Pipeline takes multiples of 16, from the base's configs\); 64 or 80 would do"),
])
def test_a_cogview4_size_follows_its_configs_and_pipeline(patch: int, resolution: int, why: str, cogview4: Path,
                                                          circles: Path, tmp_path: Path, nothing_loads: None) -> None:
    base = _edited(cogview4, tmp_path, "transformer/config.json", patch_size=patch)
    raw = run_config(base, circles, tmp_path / "run", model={"family": "cogview4"}, method={"kind": "lora"},
                     data={"resolution": resolution})
    with pytest.raises(PathError, match=f"data.resolution = {resolution} {why}"):
        _train(raw)
    assert not (tmp_path / "run").exists()


def test_generate_refuses_a_size_the_base_cannot_take(cogview4: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      nothing_loads: None) -> None:
    code = main(["generate", "--base", str(cogview4), "--prompt", "red circle", "--resolution", "72",
                 "--out", str(tmp_path / "out.png")])
    assert code == 2
    assert "--resolution = 72 must be a multiple of 16 (the VAE factor 2" in capsys.readouterr().err.replace("\n", "")


def test_generate_checks_a_conditioning_image_taken_at_its_own_size(flux: Path, circles: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture,
                                                                    nothing_loads: None) -> None:
    """No --resolution and no native size in the base's configs: the --image's size is rendered."""
    from PIL import Image

    image = tmp_path / "odd.png"
    Image.new("RGB", (33, 32)).save(image)
    base = _edited(flux, tmp_path, "vae/config.json", block_out_channels=[4, 4])  # factor 2: sides of 4
    net = tmp_path / "net"
    _flux_controlnet(base, net)
    code = main(["generate", "--base", str(base), "--controlnet", str(net), "--image", str(image), "--prompt", "red",
                 "--out", str(tmp_path / "out.png")])
    assert code == 2
    assert "'s width = 33 must be a multiple of 4" in capsys.readouterr().err.replace("\n", "")


# --- the Flux ControlNet's depth -------------------------------------------------------


def _flux_run(base: Path, circles: Path, out: Path, **method: object) -> dict:
    raw = run_config(base, circles, out, circles, model={"family": "flux"}, data={"resolution": 64})
    raw["method"] |= method
    return raw


def test_a_flux_controlnet_of_no_blocks_is_refused_when_the_config_loads(flux: Path, circles: Path) -> None:
    raw = _flux_run(flux, circles, Path("out"), controlnet_double_blocks=0, controlnet_single_blocks=0)
    with pytest.raises(ConfigError, match="method.controlnet_double_blocks and controlnet_single_blocks are both 0"):
        build_config(raw)
    raw["method"] |= {"controlnet_single_blocks": 1}
    assert build_config(raw).method.controlnet_single_blocks == 1  # single-stream blocks alone steer it


def test_more_controlnet_blocks_than_the_base_has_are_refused_before_it_loads(flux: Path, circles: Path,
                                                                              tmp_path: Path,
                                                                              nothing_loads: None) -> None:
    raw = _flux_run(flux, circles, tmp_path / "run", controlnet_double_blocks=5, controlnet_single_blocks=1)
    with pytest.raises(ConfigError, match=r"method.controlnet_double_blocks = 5: the base's transformer has 1 "
                                          r"dual-stream blocks \(num_layers in transformer/config.json\)"):
        _train(raw)


def test_the_default_depth_on_a_smaller_base_copies_all_its_blocks_saying_so(flux: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    from diffusers import FluxTransformer2DModel

    from difftune.methods.controlnet.spec import ControlNetMethod
    from difftune.families import Parts, get_family

    transformer = FluxTransformer2DModel.from_pretrained(flux, subfolder="transformer")
    parts = Parts(str(flux), {"transformer": transformer}, "transformer")
    net = get_family("flux").make_controlnet(parts, None, ControlNetMethod())  # 4 and 4 by default
    assert len(net.transformer_blocks) == 1 and len(net.single_transformer_blocks) == 1
    assert "controlnet_double_blocks / _single_blocks = 4 / 4: the base's transformer has 1 / 1" in caplog.text


def test_block_counts_with_a_controlnet_to_continue_are_refused(flux: Path, circles: Path, tmp_path: Path) -> None:
    raw = _flux_run(flux, circles, Path("out"), controlnet=str(tmp_path), controlnet_single_blocks=2)
    with pytest.raises(ConfigError, match="method.controlnet_single_blocks: method.controlnet continues an existing "
                                          "ControlNet, which keeps its own blocks"):
        build_config(raw)


# --- the base's family -----------------------------------------------------------------


def test_a_base_of_another_family_is_named_by_its_family_when_the_config_loads(cogview4: Path,
                                                                               circles: Path) -> None:
    """family left at "sd" on a CogView4 base: the base is named, not "sd trains ...". """
    raw = run_config(cogview4, circles, Path("out"), method={"kind": "control"})
    with pytest.raises(ConfigError, match=r"model.pretrained = .* is a CogView4 pipeline \(family 'cogview4'\), but "
                                          r"model.family is 'sd': set model.family to 'cogview4'"):
        build_config(raw)


def test_an_unknown_family_is_said_with_what_the_base_is(cogview4: Path, circles: Path) -> None:
    raw = run_config(cogview4, circles, Path("out"), model={"family": "cogview"}, method={"kind": "lora"})
    with pytest.raises(ConfigError, match=r"model.family: unknown family 'cogview'; difftune has 'cogview4', "
                                          r"'flux', 'qwenimage', 'qwenimage_edit', 'sd', 'sd3', 'sdxl', and "
                                          r"model.pretrained .* is a CogView4 pipeline: set model.family = 'cogview4'"):
        build_config(raw)


def test_a_base_no_family_knows_is_named_by_its_class(tiny_base: Path, circles: Path, tmp_path: Path,
                                                      nothing_loads: None) -> None:
    base = _edited(tiny_base, tmp_path, "model_index.json", _class_name="HunyuanDiTPipeline",
                   unet=["diffusers", "HunyuanDiT2DModel"])
    with pytest.raises(PathError, match=r"is a HunyuanDiTPipeline \(its model_index.json\), which no "
                                        r"difftune family trains or runs"):
        _train(run_config(base, circles, tmp_path / "run"))


def test_a_pipeline_class_of_its_own_over_a_familys_models_is_that_family(tiny_base: Path, circles: Path,
                                                                          tmp_path: Path) -> None:
    """LCM's pipeline over SD's UNet and CLIP is an SD base, not refused."""
    base = _edited(tiny_base, tmp_path, "model_index.json", _class_name="LatentConsistencyModelPipeline")
    assert build_config(run_config(base, circles, Path("out"))).model.family == "sd"


# --- what a family's pipeline or a launch cannot take -----------------------------------


def test_a_negative_prompt_with_flux_is_refused_before_it_loads(flux: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture,
                                                                nothing_loads: None) -> None:
    code = main(["generate", "--base", str(flux), "--prompt", "red", "--negative-prompt", "blue",
                 "--out", str(tmp_path / "out.png")])
    err = capsys.readouterr().err.replace("\n", "")
    assert code == 2 and "--negative-prompt: FLUX.1 is guidance-distilled" in err and "Traceback" not in err


def test_a_conditioning_scale_without_a_controlnet_is_refused(tiny_base: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture,
                                                              nothing_loads: None) -> None:
    code = main(["generate", "--base", str(tiny_base), "--prompt", "red", "--conditioning-scale", "0.5",
                 "--out", str(tmp_path / "out.png")])
    assert code == 2 and "--conditioning-scale is the strength of a ControlNet" in capsys.readouterr().err


@pytest.mark.parametrize(("method", "message"), [
    ({"kind": "lora"}, "model.quantize = 'nf4' under FSDP2: a quantized base is not sharded"),
    ({"kind": "lora", "train_text_encoder": True}, "method 'lora' trains the text encoders (method.train_text_encoder, "
                                                   "or its own kind) under FSDP2: a sharded launch trains one module"),
])
def test_what_fsdp2_cannot_train_is_refused_before_anything_loads(method: dict, message: str, tiny_base: Path,
                                                                  circles: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  nothing_loads: None) -> None:
    from difftune.training.engines import EngineError

    for name, value in {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)  # what `accelerate launch` with configs/accelerate/fsdp2.yaml exports
    raw = run_config(tiny_base, circles, tmp_path / "run", method=method,
                     model={"quantize": "nf4"} if "train_text_encoder" not in method else {})
    with pytest.raises(EngineError, match=re.escape(message)):
        _train(raw)


@pytest.mark.parametrize(("lora", "message"), [
    ({"target_modules": ["to_q", "to_qq"]},
     r"method.lora.target_modules: 'to_qq' match no module of the base's unet, so nothing would adapt there "
     r"\(did you mean 'to_q'\?\)"),
    ({"text_encoder_target_modules": ["q_proj", "v_projection"]},
     r"method.lora.text_encoder_target_modules: 'v_projection' match no module of the base's text_encoder"),
])
def test_a_lora_target_the_base_lacks_is_refused_before_it_loads(lora: dict, message: str, tiny_base: Path,
                                                                 circles: Path, tmp_path: Path,
                                                                 nothing_loads: None) -> None:
    """peft drops a target that matches nothing (when another matches): refused instead."""
    raw = run_config(tiny_base, circles, tmp_path / "run",
                     method={"kind": "lora", "train_text_encoder": True, "lora": lora})
    with pytest.raises(ConfigError, match=message):
        _train(raw)


def test_flux_lora_targets_are_checked_on_the_text_encoder_it_trains(flux: Path, circles: Path) -> None:
    """Flux adapts CLIP (q_proj...), never T5 (q, k, v, o): the defaults fit."""
    from difftune.families import get_family
    from difftune.training.setup import check_lora_targets

    raw = run_config(flux, circles, Path("out"), model={"family": "flux"},
                     method={"kind": "lora", "train_text_encoder": True})
    check_lora_targets(build_config(raw), get_family("flux"))


# --- exports that have no such format ----------------------------------------------------


def _flux_controlnet(base: Path, out: Path) -> Path:
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(base, subfolder="transformer")
    config = transformer.config
    FluxControlNetModel.from_transformer(transformer, num_layers=1, num_single_layers=1,
                                         attention_head_dim=config.attention_head_dim,
                                         num_attention_heads=config.num_attention_heads).save_pretrained(out)
    return out


def test_export_controlnet_of_a_flux_controlnet_is_a_sentence(flux: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    net = _flux_controlnet(flux, tmp_path / "net")
    code = main(["export", "controlnet", str(net), str(tmp_path / "net.safetensors")])
    err = capsys.readouterr().err.replace("\n", "")
    assert code == 2 and "holds a FluxControlNetModel; the original single-file ControlNet layout" in err
    assert "KeyError" not in err and not (tmp_path / "net.safetensors").exists()


def test_export_single_file_of_a_family_without_the_layout_is_a_sentence(flux: Path, cogview4: Path,
                                                                         tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    """Only families with the "single_file" capability write one; the others are named."""
    for base, name in ((flux, "FLUX.1"), (cogview4, "CogView4")):
        code = main(["export", "single-file", str(base), str(tmp_path / "out.safetensors")])
        err = capsys.readouterr().err.replace("\n", "")
        assert code == 2 and f"is a {name} pipeline, whose single-file layout difftune does not write yet" in err
        assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("family", [None, "flux", "cogview4"])
def test_kohya_export_of_a_transformer_lora_is_a_sentence(family: str | None, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    import torch
    from safetensors.torch import save_file

    lora = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 4)}, lora)
    code = main(["export", "lora", str(lora), str(tmp_path / "kohya.safetensors"),
                 *(["--family", family] if family else [])])
    err = capsys.readouterr().err.replace("\n", "")
    assert code == 2 and "has no kohya names that difftune writes: the kohya format is written for 'sd', 'sdxl'" in err
    assert "--format diffusers" in err and not (tmp_path / "kohya.safetensors").exists()
