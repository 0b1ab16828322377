"""End to end on the tiny pipeline: train, checkpoint, validate, resume, load in diffusers."""

import re
from pathlib import Path

import pytest
import torch
from conftest import run_config
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file

from difftune.config import build_config
from difftune.data import DataError
from difftune.families import ModelInputs, get_family
from difftune.training.checkpoint import ResumeError
from difftune.training.events import read_events
from difftune.training.loop import Run, train


@pytest.fixture(scope="module")
def finished_run(tiny_base: Path, circles: Path, held_out: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("runs") / "run"
    raw = run_config(tiny_base, circles, out, held_out, train={"checkpoints_total_limit": 1})
    raw["train"]["report_to"] = "tensorboard"
    run = Run(build_config(raw))
    run.fit()
    return run


def test_run_directory_holds_everything(finished_run: Run) -> None:
    out = finished_run.run_dir
    assert (out / "config.toml").is_file()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000004"]  # limit 1 pruned step 2
    checkpoint = out / "checkpoints" / "step-000004"
    assert (checkpoint / "COMPLETE").is_file() and (checkpoint / "optimizer.bin").is_file()
    assert not list(checkpoint.glob("model*.safetensors"))  # weights stored once, in diffusers format
    assert (checkpoint / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    for step in ("step-000002", "step-000004"):
        folder = out / "validation" / step
        grid = Image.open(folder / "pair-00-grid.png")  # conditioning | 1 image, scaled 3x, over its prompt
        assert grid.width == 384 and grid.height > 192
        assert (folder / "pair-00-image-0.png").is_file()
    assert list((out / "logs").rglob("events.out.tfevents*"))
    events = read_events(out)
    kinds = [e["event"] for e in events]
    assert kinds.count("step") == 4 and kinds.count("checkpoint") == 2 and kinds.count("validation") == 2
    step = next(e for e in events if e["event"] == "step")
    assert {"step", "loss", "lr", "samples_per_s", "eta_s", "peak_memory_mb"} <= set(step)
    assert step["lr"] == pytest.approx(1e-3)


def test_base_unet_is_bit_identical_after_training(finished_run: Run, tiny_base: Path) -> None:
    original = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet").state_dict()
    trained = finished_run.trainee.parts.denoiser.state_dict()
    assert original.keys() == trained.keys()
    assert all(torch.equal(original[k], trained[k]) for k in original)


def test_controlnet_changed_and_final_matches_last_checkpoint(finished_run: Run) -> None:
    out = finished_run.run_dir
    final = load_file(out / "final" / "diffusion_pytorch_model.safetensors")
    checkpoint = load_file(out / "checkpoints" / "step-000004" / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(final[k], checkpoint[k]) for k in final)
    zero_conv = final["controlnet_down_blocks.0.weight"]
    assert zero_conv.abs().sum() > 0  # trained away from its zero initialisation


def test_finished_run_frees_gradients_and_optimizer_state(finished_run: Run) -> None:
    # final/ is written and validation generates without them (an SD1.5 ControlNet's
    # gradients and Adam state are 4.3 GB in fp32)
    assert all(p.grad is None for p in finished_run.trainee.trained["controlnet"].parameters())
    assert len(finished_run.optimizer.optimizer.state) == 0


def test_final_folder_runs_in_diffusers_pipeline(finished_run: Run, tiny_base: Path, held_out: Path) -> None:
    controlnet = ControlNetModel.from_pretrained(finished_run.run_dir / "final")
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_base, controlnet=controlnet, safety_checker=None, requires_safety_checker=False
    )
    image = Image.open(held_out / "conditioning_images" / "000000.png")
    result = pipe("red circle with blue background", image=image, num_inference_steps=2,
                  output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert result.shape == (1, 64, 64, 3)


def test_fresh_controlnet_is_a_no_op(tiny_base: Path) -> None:
    family = get_family("sd")
    config = build_config(run_config(tiny_base, Path("."), Path(".")))
    parts = family.load(config.model)
    controlnet = family.make_controlnet(parts, None)
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 4, 32, 32, generator=generator)
    text = family.encode_prompts(parts, ["red circle with blue background", ""])
    inputs = ModelInputs(noisy, torch.tensor([10, 500]), text)
    conditioning = torch.rand(2, 3, 64, 64, generator=generator)
    with torch.no_grad():
        plain = family.predict(parts, inputs)
        residuals = family.controlnet_residuals(parts, controlnet, inputs, conditioning)
        controlled = family.predict(parts, inputs.with_extra(**residuals))
    assert torch.equal(plain, controlled)


def test_resumed_run_ends_with_the_same_weights(tiny_base: Path, circles: Path, tmp_path: Path) -> None:
    # batch 4 over 12 samples: 3 batches an epoch, so the resumed part crosses epochs.
    settings = {"batch_size": 4, "checkpoint_every": 2, "max_steps": 5}
    straight = build_config(run_config(tiny_base, circles, tmp_path / "a", train=settings))
    train(straight)
    interrupted = run_config(tiny_base, circles, tmp_path / "b", train={**settings, "max_steps": 2})
    train(build_config(interrupted))
    interrupted["train"]["max_steps"] = 5
    resumed = Run(build_config(interrupted))
    assert resumed.resume_from == tmp_path / "b" / "checkpoints" / "step-000002"
    resumed.fit()
    a = load_file(tmp_path / "a" / "final" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    starts = [e for e in read_events(tmp_path / "b") if e["event"] == "start"]
    assert [s["step"] for s in starts] == [0, 2]


def test_resume_from_missing_checkpoint_fails_before_models_load(tiny_base: Path, circles: Path, tmp_path: Path) -> None:
    raw = run_config(tiny_base, circles, tmp_path / "r", train={"resume": "step-000099"})
    with pytest.raises(ResumeError, match="step-000099.*does not exist"):
        Run(build_config(raw))


def test_missing_validation_image_is_named(tiny_base: Path, circles: Path, tmp_path: Path) -> None:
    raw = run_config(tiny_base, circles, tmp_path / "v")
    raw["validation"].update(prompts=["x"], images=[str(tmp_path / "nope.png")])
    with pytest.raises(DataError, match=r"validation.images\[0\]: no such file .*nope.png"):
        Run(build_config(raw))


def test_8bit_adam_trains_and_resumes_exactly(tiny_base: Path, circles: Path, tmp_path: Path) -> None:
    """bitsandbytes' AdamW8bit (it runs on the CPU since 0.48): its quantized state is
    checkpointed and restored, so a resumed run matches one that never stopped."""
    pytest.importorskip("bitsandbytes")
    settings = {"batch_size": 4, "checkpoint_every": 2, "max_steps": 4, "use_8bit_adam": True}
    straight = Run(build_config(run_config(tiny_base, circles, tmp_path / "a", train=settings)))
    assert type(straight.optimizer.optimizer).__name__ == "AdamW8bit"
    straight.fit()
    interrupted = run_config(tiny_base, circles, tmp_path / "b", train={**settings, "max_steps": 2})
    train(build_config(interrupted))
    interrupted["train"]["max_steps"] = 4
    train(build_config(interrupted))
    a = load_file(tmp_path / "a" / "final" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "diffusion_pytorch_model.safetensors")
    base = load_file(tmp_path / "a" / "checkpoints" / "step-000002" / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(a[k], base[k]) for k in a)  # steps 3-4 changed the weights
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_8bit_adam_keeps_a_lora_base_in_channels_last(tiny_base: Path, circles: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    raw = run_config(tiny_base, circles, tmp_path / "run", method={"kind": "lora", "lora": {
        "rank": 2, "target_modules": ["to_q", "conv1"]}}, train={"use_8bit_adam": True, "max_steps": 1})
    unet = Run(build_config(raw)).trainee.trained["unet"]
    conv = unet.down_blocks[0].resnets[0].conv1
    assert conv.base_layer.weight.is_contiguous(memory_format=torch.channels_last)  # frozen: channels_last
    assert conv.lora_A["default"].weight.dim() == 4 and conv.lora_A["default"].weight.is_contiguous()


def test_a_run_without_a_terminal_prints_progress_lines_and_each_validations_scores(
        tiny_base: Path, circles: Path, held_out: Path, tmp_path: Path) -> None:
    """Piped to a file (nohup, slurm, CI), a run writes plain progress lines every
    train.log_every steps, and the metric against its floor at each validation."""
    import io

    from rich.console import Console

    raw = run_config(tiny_base, circles, tmp_path / "run", held_out,
                     train={"max_steps": 4, "log_every": 2, "checkpoint_every": 4},
                     validation={"every": 4, "metric": "fill_circles", "metric_data": str(held_out),
                                 "metric_samples": 2})
    log = io.StringIO()
    train(build_config(raw), console=Console(file=log, width=200))
    lines = log.getvalue().splitlines()
    progress = [line for line in lines if line.startswith("step ") and "samples/s" in line]
    assert [line.split()[1] for line in progress] == ["2/4", "4/4"], lines
    assert re.search(r"loss \d+\.\d{4}  [\d.]+ samples/s  \d+:\d\d:\d\d left", progress[0]), progress
    assert "step 4/4: saving a checkpoint" in lines, "\n".join(lines)
    scores = [line for line in lines if line.startswith("validation at step 4: ")]
    assert len(scores) == 1 and "iou" in scores[0] and "(floor " in scores[0], lines
