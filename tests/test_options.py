"""train_controlnet.py's options do what they say on the tiny pipeline."""

from pathlib import Path

import pytest
import torch
from conftest import run_config

from difftune.config import build_config
from difftune.training.events import read_events
from difftune.training.loop import Run
from difftune.training.optim import learning_rate


def _steps(run_dir: Path) -> list[dict]:
    return [e for e in read_events(run_dir) if e["event"] == "step"]


def test_accumulation_checkpointing_and_schedule(tiny_base: Path, circles: Path, tmp_path: Path) -> None:
    raw = run_config(tiny_base, circles, tmp_path / "run", train={
        "gradient_accumulation_steps": 2, "gradient_checkpointing": True, "set_grads_to_none": True,
        "lr_scheduler": "linear", "lr_warmup_steps": 1, "max_steps": 3, "checkpoint_every": 10,
    })
    run = Run(build_config(raw))
    assert run.trainee.trained["controlnet"].is_gradient_checkpointing
    run.fit()
    steps = _steps(tmp_path / "run")
    assert [s["step"] for s in steps] == [1, 2, 3]
    # linear warmup over 1 step, then linear decay to 0 at step 3
    assert [round(s["lr"], 6) for s in steps] == [0.001, 0.0005, 0.0]
    # 2 micro-batches of 2 per optimizer step: 6 of the 12 samples in 3 steps, one epoch
    assert all(s["epoch"] == 0 for s in steps)


def test_epochs_set_the_length(tiny_base: Path, circles: Path, tmp_path: Path) -> None:
    raw = run_config(tiny_base, circles, tmp_path / "run", train={"max_steps": None, "epochs": 2, "batch_size": 6})
    del raw["train"]["max_steps"]
    run = Run(build_config(raw))
    assert run.max_steps == 4  # 12 samples / batch 6 = 2 steps an epoch, 2 epochs
    run.fit()
    assert [s["epoch"] for s in _steps(tmp_path / "run")] == [0, 0, 1, 1]


def test_bf16_mixed_precision_keeps_controlnet_fp32(tiny_base: Path, circles: Path, held_out: Path, tmp_path: Path) -> None:
    raw = run_config(tiny_base, circles, tmp_path / "run", held_out, train={"mixed_precision": "bf16", "max_steps": 1})
    run = Run(build_config(raw))
    assert run.trainee.parts.denoiser.dtype == torch.bfloat16
    assert run.trainee.parts.vae.dtype == torch.bfloat16
    run.fit()
    trained = run.accelerator.unwrap_model(run.trainee.trained["controlnet"])
    assert all(p.dtype == torch.float32 for p in trained.parameters())
    assert torch.isfinite(torch.tensor(_steps(tmp_path / "run")[0]["loss"]))
    assert (tmp_path / "run" / "validation" / "step-000001" / "pair-00-grid.png").is_file()


def test_continue_from_existing_controlnet(tiny_base: Path, circles: Path, tmp_path: Path) -> None:
    first = run_config(tiny_base, circles, tmp_path / "first", train={"max_steps": 1})
    Run(build_config(first)).fit()
    second = run_config(tiny_base, circles, tmp_path / "second", train={"max_steps": 1},
                        method={"kind": "controlnet", "controlnet": str(tmp_path / "first" / "final")})
    run = Run(build_config(second))
    loaded = run.accelerator.unwrap_model(run.trainee.trained["controlnet"]).state_dict()
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "first" / "final" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


@pytest.mark.parametrize("scale_lr,expected", [(False, 1e-4), (True, 1e-4 * 3 * 2 * 1)])
def test_scale_lr(scale_lr: bool, expected: float) -> None:
    config = build_config({"model": {"pretrained": "b"}, "data": {"path": "d"}, "train": {
        "output_dir": "o", "learning_rate": 1e-4, "batch_size": 2, "gradient_accumulation_steps": 3,
        "scale_lr": scale_lr}})
    assert learning_rate(config.train, num_processes=1) == pytest.approx(expected)


def test_full_method_trains_the_unet_and_saves_a_pipeline(tiny_base: Path, circles: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    raw = run_config(tiny_base, circles, tmp_path / "run", method={"kind": "full"}, train={"max_steps": 2})
    raw["validation"] = {"every": 1, "prompts": ["red circle with blue background"], "num_images": 1, "steps": 2}
    Run(build_config(raw)).fit()
    trained = StableDiffusionPipeline.from_pretrained(tmp_path / "run" / "final")
    base = StableDiffusionPipeline.from_pretrained(tiny_base)
    changed = [k for k, v in base.unet.state_dict().items() if not torch.equal(v, trained.unet.state_dict()[k])]
    assert len(changed) > 0.9 * len(base.unet.state_dict())
    assert all(torch.equal(v, trained.vae.state_dict()[k]) for k, v in base.vae.state_dict().items())
    grid = tmp_path / "run" / "validation" / "step-000001" / "pair-00-grid.png"
    assert grid.is_file()
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "unet" / "config.json").is_file()


def test_controlnet_validation_prompts_need_images(tiny_base: Path, circles: Path, tmp_path: Path) -> None:
    from difftune.config import ConfigError

    raw = run_config(tiny_base, circles, tmp_path / "run")
    raw["validation"]["prompts"] = ["red circle with blue background"]
    with pytest.raises(ConfigError, match="validation.images: method 'controlnet' needs a conditioning image"):
        Run(build_config(raw))


def test_full_method_under_bf16_saves_an_fp32_pipeline_that_generates(tiny_base: Path, circles: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    raw = run_config(tiny_base, circles, tmp_path / "run", method={"kind": "full"},
                     train={"max_steps": 1, "mixed_precision": "bf16"})
    Run(build_config(raw)).fit()
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "run" / "final")
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    image = pipe("red circle with blue background", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_loader_workers_default_to_none_on_the_cpu_and_some_on_a_gpu(tiny_base: Path, circles: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from difftune.training.setup import loader_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 1)
    config = build_config(run_config(tiny_base, circles, tmp_path / "run"))
    assert loader_workers(config, torch.device("cpu")) == 0
    assert loader_workers(config, torch.device("cuda", 0)) == 8
    cached = build_config(run_config(tiny_base, circles, tmp_path / "run", data={"cache_latents": True}))
    assert loader_workers(cached, torch.device("cuda", 0)) == 2  # nothing to decode
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 8)
    assert loader_workers(config, torch.device("cuda", 0)) == 1  # 2 cores per GPU, one left for the process
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 1)  # each process sees its own GPU only
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # but torchrun says there are 4 here
    assert loader_workers(config, torch.device("cuda", 0)) == 3
    chosen = build_config(run_config(tiny_base, circles, tmp_path / "run", data={"num_workers": 3}))
    assert loader_workers(chosen, torch.device("cpu")) == 3


def test_loader_workers_train_exactly_as_the_main_process(tiny_base: Path, circles: Path, tmp_path: Path) -> None:
    """Two persistent workers over two epochs (12 samples, batch 4, 5 steps): the same
    weights as loading in the training process."""
    from safetensors.torch import load_file

    finals = []
    for workers in (0, 2):
        raw = run_config(tiny_base, circles, tmp_path / str(workers), data={"num_workers": workers},
                         train={"batch_size": 4, "max_steps": 5, "checkpoint_every": 10})
        finals.append(Run(build_config(raw)).fit())
    a, b = (load_file(f / "diffusion_pytorch_model.safetensors") for f in finals)
    assert all(torch.equal(a[k], b[k]) for k in a)
