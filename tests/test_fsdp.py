"""FSDP2 and multi-node launches through accelerate, on the CPU (gloo), with the launch
configs of configs/accelerate/: a sharded run trains what one process does at double
batch, its final/ loads in diffusers, it resumes exactly, and two "machines" on
localhost run one job."""

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import run_config
from safetensors.torch import load_file

from difftune.config import build_config, to_toml
from difftune.training.checkpoint import ResumeError
from difftune.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_CONFIGS = ROOT / "configs" / "accelerate"
TOLERANCE = 1e-5
"""Largest weight difference allowed between a sharded run and one process at double
batch: sums in another order. Every run of a comparison fixes train.cpu_threads = 1, in
each rank too: the thread count splits a matmul's sums, and with 2 threads a side the
full fine-tune differed by 1.0e-5 (3 steps, weights moved 3e-3), against 1.5e-6 with 1
(ControlNet 1.2e-7 either way; measured 2026-12-05 on the 2-core box, under load)."""

WEIGHTS = {"controlnet": "diffusion_pytorch_model.safetensors", "lora": "pytorch_lora_weights.safetensors",
           "full": "unet/diffusion_pytorch_model.safetensors"}


def _config(base: Path, data: Path, out: Path, kind: str, **train_settings: object) -> dict:
    """A run that validates once, at the end (with whole weights gathered from the shards)."""
    raw = run_config(base, data, out, method={"kind": kind},
                     train={"checkpoint_every": 2, "cpu_threads": 1, **train_settings},
                     data={"cache_latents": False, "cache_text": False})  # the same whatever max_steps is
    raw["validation"] = {"every": 100, "prompts": ["red circle with blue background"], "num_images": 1, "steps": 2}
    if kind == "controlnet":
        raw["validation"]["images"] = [str(data / "conditioning_images" / "000000.png")]
    return raw


def _launch(raw: dict, where: Path, *flags: str, config: str = "fsdp2.yaml") -> subprocess.Popen:
    path = where / f"{Path(raw['train']['output_dir']).name}.toml"
    path.write_text(to_toml(build_config(raw)))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH_CONFIGS / config),
               *flags, "-m", "difftune", "train", str(path)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> None:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]


def _largest_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def _engine(run: Path) -> dict:
    checkpoint = sorted((run / "checkpoints").glob("step-*"))[-1]
    return json.loads((checkpoint / "engine.json").read_text())


@pytest.mark.parametrize("kind", ["controlnet", "lora", "full"])
def test_fsdp2_trains_what_one_process_does_at_double_batch(kind: str, tiny_base: Path, circles: Path,
                                                            tmp_path: Path) -> None:
    _finish(_launch(_config(tiny_base, circles, tmp_path / "two", kind, max_steps=3, batch_size=2), tmp_path))
    train(build_config(_config(tiny_base, circles, tmp_path / "one", kind, max_steps=3, batch_size=4)))
    assert _engine(tmp_path / "two") == {"processes": 2, "engine": "fsdp2"}
    events = [json.loads(line) for line in (tmp_path / "two" / "events.jsonl").read_text().splitlines()]
    engine = next(e for e in events if e["event"] == "engine")
    assert engine["frozen_denoiser_sharded"] == (kind == "controlnet")  # the frozen UNet: a share per rank
    checkpoint = tmp_path / "two" / "checkpoints" / "step-000002"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir()  # accelerate's sharded state, one file per rank
    difference = _largest_difference(tmp_path / "two" / "final" / WEIGHTS[kind], tmp_path / "one" / "final" / WEIGHTS[kind])
    assert difference < TOLERANCE
    _generates_in_diffusers(kind, tiny_base, tmp_path / "two" / "final")


def test_fsdp2_keeps_a_sharded_ema_that_matches_one_process_and_resumes(tiny_base: Path, circles: Path,
                                                                         tmp_path: Path) -> None:
    def config(out: str, steps: int, batch: int) -> dict:
        raw = _config(tiny_base, circles, tmp_path / out, "full", max_steps=steps, batch_size=batch)
        raw["method"]["ema"] = {"decay": 0.5}  # a short average, so that the last steps weigh
        return raw

    _finish(_launch(config("two", 4, 2), tmp_path))
    train(build_config(config("one", 4, 4)))
    name = WEIGHTS["full"]
    assert _largest_difference(tmp_path / "two" / "final" / name, tmp_path / "one" / "final" / name) < TOLERANCE
    _finish(_launch(config("cut", 2, 2), tmp_path))  # stopped at its step-2 checkpoint, then resumed
    _finish(_launch(config("cut", 4, 2), tmp_path))
    assert _largest_difference(tmp_path / "two" / "final" / name, tmp_path / "cut" / "final" / name) == 0.0
    # final/ is the average, not the last weights: a run without EMA ends elsewhere
    train(build_config({**_config(tiny_base, circles, tmp_path / "plain", "full", max_steps=4, batch_size=4)}))
    assert _largest_difference(tmp_path / "plain" / "final" / name, tmp_path / "one" / "final" / name) > 1e-4


def _generates_in_diffusers(kind: str, base: Path, final: Path) -> None:
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline
    from PIL import Image

    settings = {"num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np",
                "generator": torch.Generator().manual_seed(0)}
    if kind == "controlnet":
        pipe = StableDiffusionControlNetPipeline.from_pretrained(base, controlnet=ControlNetModel.from_pretrained(final),
                                                                 safety_checker=None)
        image = pipe("red circle", image=Image.new("RGB", (64, 64)), **settings).images[0]
    elif kind == "lora":
        pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
        plain = pipe("red circle", **settings).images[0]
        pipe.load_lora_weights(final)
        image = pipe("red circle", **{**settings, "generator": torch.Generator().manual_seed(0)}).images[0]
        assert abs(image - plain).max() > 1e-4  # the adapter changes the output
    else:
        image = StableDiffusionPipeline.from_pretrained(final, safety_checker=None)("red circle", **settings).images[0]
    assert image.shape == (64, 64, 3)


def test_fsdp2_resumes_exactly_after_a_kill_and_refuses_another_process_count(
        tiny_base: Path, circles: Path, tmp_path: Path) -> None:
    # a long run, killed (SIGKILL, every process) once its step-2 checkpoint is complete
    launch = _launch(_config(tiny_base, circles, tmp_path / "killed", "controlnet", max_steps=400, batch_size=2),
                     tmp_path)
    marker = tmp_path / "killed" / "checkpoints" / "step-000002" / "COMPLETE"
    deadline = time.monotonic() + 240
    while not marker.exists() and launch.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    launcher = psutil.Process(launch.pid)
    for process in [*launcher.children(recursive=True), launcher]:  # torchrun's workers, then itself
        process.kill()
    launch.communicate()
    assert marker.exists()
    last = max(int(c.name.removeprefix("step-")) for c in (tmp_path / "killed" / "checkpoints").glob("step-*")
               if (c / "COMPLETE").exists())
    assert last < 400
    shutil.copytree(tmp_path / "killed", tmp_path / "alone")
    steps = last + 2  # resumed from its last checkpoint, two steps more; against a run that never stopped
    straight = _config(tiny_base, circles, tmp_path / "straight", "controlnet", max_steps=steps, batch_size=2)
    _finish(_launch(straight, tmp_path))
    _finish(_launch({**straight, "train": {**straight["train"], "output_dir": str(tmp_path / "killed")}}, tmp_path))
    name = WEIGHTS["controlnet"]
    assert _largest_difference(tmp_path / "straight" / "final" / name, tmp_path / "killed" / "final" / name) == 0.0
    alone = _config(tiny_base, circles, tmp_path / "alone", "controlnet", max_steps=steps, batch_size=2)
    with pytest.raises(ResumeError, match=r"written by 2 process\(es\) \(fsdp2\); this launch has 1"):
        train(build_config(alone))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_machines_on_localhost_train_one_job(tiny_base: Path, circles: Path, tmp_path: Path) -> None:
    raw = _config(tiny_base, circles, tmp_path / "nodes", "controlnet", max_steps=3, batch_size=2)
    flags = ["--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port())]
    machines = [_launch(raw, tmp_path, *flags, "--machine_rank", str(rank), config="two_nodes.yaml") for rank in (0, 1)]
    for machine in machines:
        _finish(machine)
    train(build_config(_config(tiny_base, circles, tmp_path / "one", "controlnet", max_steps=3, batch_size=4)))
    name = WEIGHTS["controlnet"]
    assert _largest_difference(tmp_path / "nodes" / "final" / name, tmp_path / "one" / "final" / name) < TOLERANCE
    events = [json.loads(line) for line in (tmp_path / "nodes" / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("start") == 1  # one job, written by its main process


@pytest.mark.parametrize("name", sorted(p.name for p in LAUNCH_CONFIGS.glob("*.yaml")))
def test_launch_configs_read_in_accelerate(name: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(LAUNCH_CONFIGS / name))
    if "fsdp" in config.distributed_type.lower():
        assert config.fsdp_config["fsdp_version"] == 2


def test_fsdp_version_1_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from difftune.training.engines import EngineError, check_fsdp_version

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(EngineError, match="fsdp_version: 2"):
        check_fsdp_version()
