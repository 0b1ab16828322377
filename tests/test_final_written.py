"""No finished training without a result: a run that trained to the end writes final/,
whatever the family, method, model.quantize and options, and where final/ cannot be
written whole, the last checkpoint holds the trained weights and the message says so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WORDS, run_config
from PIL import Image

from difftune.config import build_config
from difftune.families.cogview4.tiny import build_tiny_cogview4
from difftune.training.loop import train

PROMPT = "red circle with blue background"


@pytest.fixture(scope="module")
def tiny_cogview4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_cogview4(tmp_path_factory.mktemp("cogview4") / "tiny-cogview4", WORDS, seed=0)


def _control_lora(base: Path, circles: Path, out: Path, **model: object) -> dict:
    """A 2-step CogView4 Control-LoRA run with no checkpoint before the end."""
    raw = run_config(base, circles, out, model={"family": "cogview4", **model},
                     train={"max_steps": 2, "checkpoint_every": 100, "learning_rate": 1e-2})
    raw["method"] = {"kind": "control", "lora": {"rank": 4}}
    raw["validation"] = {"every": 100, "steps": 2, "num_images": 1, "prompts": [PROMPT],
                         "images": [str(circles / "conditioning_images" / "000000.png")]}
    return raw


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["nf4", "int8", "fp8"])
def test_a_cogview4_control_lora_on_a_quantized_base_writes_final(kind: str, tiny_cogview4: Path, circles: Path,
                                                                  tmp_path: Path) -> None:
    """The fused transformer CogView4ControlPipeline needs cannot be fused into 4- or
    8-bit weights; it is fused onto the base read again in full precision, so final/
    holds the adapters and the fused transformer, and the last validation ran."""
    from diffusers import CogView4ControlPipeline, CogView4Transformer2DModel

    final = train(build_config(_control_lora(tiny_cogview4, circles, tmp_path / "run", quantize=kind)))
    assert final is not None and (final / "pytorch_lora_weights.safetensors").is_file()
    assert any(e["event"] == "validation" for e in _events(tmp_path / "run"))  # the last one, at step 2
    transformer = CogView4Transformer2DModel.from_pretrained(final, subfolder="transformer")
    assert transformer.config.in_channels == 8
    assert not any("bitsandbytes" in type(m).__module__ or hasattr(getattr(m, "weight", None), "qdata")
                   for m in transformer.modules())
    pipe = CogView4ControlPipeline.from_pretrained(tiny_cogview4, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    control = Image.open(circles / "conditioning_images" / "000000.png").convert("RGB")
    image = pipe(PROMPT, control_image=control, num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert np.isfinite(image).all()


def test_the_fused_transformer_is_the_adapters_on_the_full_precision_base(tiny_cogview4: Path, circles: Path,
                                                                          tmp_path: Path) -> None:
    """Fused in fp32 from the base's own files: the fused transformer computes what the
    base with the saved adapters computes (not adapters added to bf16-rounded weights)."""
    from diffusers import CogView4Transformer2DModel
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    from difftune.families import get_family
    from difftune.methods.control.method import widen_input

    raw = _control_lora(tiny_cogview4, circles, tmp_path / "run")
    raw["train"]["mixed_precision"] = "bf16"
    final = train(build_config(raw))
    fused = CogView4Transformer2DModel.from_pretrained(final, subfolder="transformer")
    base = CogView4Transformer2DModel.from_pretrained(tiny_cogview4, subfolder="transformer")
    family = get_family("cogview4")
    widen_input(base, family.input_projection, family.widened_config(base.config))
    metadata = json.loads(__import__("safetensors").safe_open(str(final / "pytorch_lora_weights.safetensors"),
                                                              "pt").metadata()["lora_adapter_metadata"])
    settings = {k.removeprefix("transformer."): v for k, v in metadata.items() if k.startswith("transformer.")}
    base.add_adapter(LoraConfig(r=settings["r"], lora_alpha=settings["lora_alpha"],
                                target_modules=settings["target_modules"]))
    state = {k.removeprefix("transformer."): v
             for k, v in load_file(final / "pytorch_lora_weights.safetensors").items()}
    set_peft_model_state_dict(base, state)
    latents = torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 16, base.config.text_embed_dim, generator=torch.Generator().manual_seed(1))
    sizes = torch.tensor([[16.0, 16.0]])
    call = {"hidden_states": latents, "encoder_hidden_states": text, "timestep": torch.tensor([500.0]),
            "original_size": sizes, "target_size": sizes, "crop_coords": torch.zeros(1, 2), "return_dict": False}
    with torch.no_grad():
        assert torch.allclose(fused(**call)[0], base(**call)[0], atol=1e-5)


def test_when_final_cannot_be_written_the_last_checkpoint_holds_the_weights(monkeypatch: pytest.MonkeyPatch,
                                                                           tiny_base: Path, circles: Path,
                                                                           tmp_path: Path) -> None:
    """Whatever makes final/ fail after the last step (here the method's save raising), the
    run writes a checkpoint of that step first, says where it is, and the same command
    afterwards writes final/ from it without training again."""
    from safetensors.torch import load_file

    from difftune.errors import UserError
    from difftune.methods.controlnet.method import ControlNet

    raw = run_config(tiny_base, circles, tmp_path / "run", train={"max_steps": 3, "checkpoint_every": 2})
    raw["validation"] = {"every": 100}

    def broken(*args: object) -> None:
        raise RuntimeError("a writer that cannot write this")

    monkeypatch.setattr(ControlNet, "save", broken)
    with pytest.raises(UserError, match=r"final/ could not be written \(RuntimeError: a writer that cannot write "
                                        r"this\).*checkpoints/step-000003") as raised:
        train(build_config(raw))
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000003"
    assert "same command" in str(raised.value) and (checkpoint / "COMPLETE").is_file()
    trained = load_file(checkpoint / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert not (tmp_path / "run" / "final").exists()
    failed = [e for e in _events(tmp_path / "run") if e["event"] == "final_failed"]
    assert failed and "RuntimeError" in failed[0]["traceback"]  # the bug's traceback is kept in the run
    monkeypatch.undo()
    final = train(build_config(raw))
    steps = [e["step"] for e in _events(tmp_path / "run") if e["event"] == "step"]
    assert steps == [1, 2, 3]  # nothing trained again
    saved = load_file(final / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)


def test_the_model_card_loads_a_flux_controlnet_with_its_class() -> None:
    """The card written beside final/ for the Hub: a Flux ControlNet is a FluxControlNetModel."""
    from difftune.families import get_family
    from difftune.results import RESULTS

    usage = RESULTS["controlnet"].usage(get_family("flux"), "me/net", "black-forest-labs/FLUX.1-dev")
    assert 'FluxControlNetModel.from_pretrained("me/net")' in usage and "FluxControlNetPipeline" in usage
    assert 'ControlNetModel.from_pretrained("me/net")' in RESULTS["controlnet"].usage(get_family("sd"), "me/net",
                                                                                      "base")
