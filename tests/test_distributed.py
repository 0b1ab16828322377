"""Two CPU processes (gloo) through torchrun: one job, rank 0 writes, both ranks save state."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import WORDS, run_config

from difftune.config import build_config, to_toml


def test_two_process_run(tiny_base: Path, circles: Path, held_out: Path, tmp_path: Path) -> None:
    raw = run_config(tiny_base, circles, tmp_path / "run", held_out, train={"max_steps": 2})
    config = tmp_path / "c.toml"
    config.write_text(to_toml(build_config(raw)))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "difftune", "train", str(config)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000002"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("start") == 1  # only rank 0 writes
    assert [e["event"] for e in events].count("validation") == 1  # the final one
    assert done.stderr.count("done:") == 1


def _torchrun(config: Path, processes: int, *extra: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
         "-m", "difftune", "train", str(config), *extra],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _write(raw: dict, path: Path) -> Path:
    path.write_text(to_toml(build_config(raw)))
    return path


def _losses(run: Path) -> list[float]:
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    return [e["loss"] for e in events if e["event"] == "step"]


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "final" / "diffusion_pytorch_model.safetensors")


def test_two_processes_equal_one_process_with_double_batch(tiny_base: Path, circles: Path, tmp_path: Path) -> None:
    # Noise is drawn per sample (keyed by its place in the data), and the padded epoch
    # order gives rank r every other batch, so both runs see the same samples per step.
    settings = {"max_steps": 3, "checkpoint_every": 10, "cpu_threads": 1}  # see test_fsdp.TOLERANCE
    two = _write(run_config(tiny_base, circles, tmp_path / "two", train={**settings, "batch_size": 2}), tmp_path / "2.toml")
    one = _write(run_config(tiny_base, circles, tmp_path / "one", train={**settings, "batch_size": 4}), tmp_path / "1.toml")
    _torchrun(two, 2)
    _torchrun(one, 1)
    a, b = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert len(a) == len(b) == 3
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    wa, wb = _weights(tmp_path / "two"), _weights(tmp_path / "one")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_two_process_resume_is_exact(tiny_base: Path, circles: Path, tmp_path: Path) -> None:
    settings = {"max_steps": 4, "checkpoint_every": 2, "batch_size": 2}
    straight = _write(run_config(tiny_base, circles, tmp_path / "a", train=settings), tmp_path / "a.toml")
    _torchrun(straight, 2)
    cut = _write(run_config(tiny_base, circles, tmp_path / "b", train={**settings, "max_steps": 2}), tmp_path / "b.toml")
    _torchrun(cut, 2)
    _torchrun(straight, 2, "--set", f"train.output_dir={tmp_path / 'b'}")
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all((wa[k] == wb[k]).all() for k in wa)


def test_two_processes_with_aspect_buckets_and_a_shared_cache(tiny_base: Path, tmp_path: Path) -> None:
    from test_buckets import _three_shapes

    data = _three_shapes(tmp_path / "shapes")
    cache = tmp_path / "cache"
    raw = run_config(tiny_base, data, tmp_path / "run", method={"kind": "full"},
                     data={"buckets": True, "bucket_step": 16, "cache_latents": True, "cache_text": True,
                           "encoded_cache_dir": str(cache)},
                     train={"batch_size": 2, "max_steps": 3, "checkpoint_every": 10})
    _torchrun(_write(raw, tmp_path / "c.toml"), 2)
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3]
    assert sum(e["event"] == "buckets" for e in events) == 1
    stats = [e for e in events if e["event"] == "cache"][0]
    assert stats["latents_encoded"] == 12 and stats["texts_encoded"] == 5  # 4 captions and ""
    # each process encoded its half into its own shard; the merged index holds all
    (latents,) = (cache / "latents").iterdir()
    assert len(list(latents.glob("shard-*.safetensors"))) == 2
    assert len(json.loads((latents / "index.json").read_text())["entries"]) == 12


def test_two_processes_train_mixed_edit_batches_as_one_process(tmp_path: Path) -> None:
    """An edit batch whose rows differ in references runs one denoiser call per group: under
    DDP too (several calls before one backward), and as one process with the double batch."""
    from test_edit import write_edits

    from difftune.families.flux.tiny import build_tiny_flux

    base = build_tiny_flux(tmp_path / "kontext", WORDS + ["make", "the"], seed=0, t5_length=32)
    data = write_edits(tmp_path / "edits", 8, missing=(1, 2, 5))  # 3 of the 6 two-row batches mix both kinds

    def edit_run(out: Path, batch: int) -> dict:
        raw = run_config(base, data, out, train={"max_steps": 3, "checkpoint_every": 10, "cpu_threads": 1,
                                                 "batch_size": batch},
                         validation={"every": 10, "steps": 2, "prompts": ["make the circle red"],
                                     "images": [str(data / "reference-0.png")], "num_images": 1})
        raw["model"]["family"] = "flux"
        raw["method"] = {"kind": "edit", "lora": {"rank": 4}}
        raw["data"]["cache_latents"] = False
        return raw

    _torchrun(_write(edit_run(tmp_path / "two", 2), tmp_path / "2.toml"), 2)
    _torchrun(_write(edit_run(tmp_path / "one", 4), tmp_path / "1.toml"), 1)
    a, b = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert len(a) == len(b) == 3
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    from safetensors.torch import load_file

    wa, wb = (load_file(tmp_path / run / "final" / "pytorch_lora_weights.safetensors") for run in ("two", "one"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
