"""Fault suite, classes 1 and 3: the run's contract on resume, and damaged checkpoints.

Each case starts from a copy of a finished 2-step run (a checkpoint at steps 1 and 2)
and asks `plan_run` (no torch, no model) what `train` would do with a changed config or a
damaged checkpoint: refuse with the differences, continue, or say it is finished.
"""

import json
import shutil
from pathlib import Path

import pytest
from conftest import copy_run, run_config, unfinished

from difftune.config import build_config
from difftune.training.checkpoint import ResumeError, complete_checkpoints, verify_checkpoint
from difftune.training.plan import plan_run
from difftune.training.resume_contract import MAY_CHANGE


def _config(run: Path, base: Path, data_dir: Path, **sections):
    raw = run_config(base, data_dir, run, train={"max_steps": 2, "checkpoint_every": 1})
    raw["validation"] = {"every": 100}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return build_config(raw)


REFUSED = [
    ("train", "learning_rate", 2e-3),
    ("train", "batch_size", 3),
    ("train", "seed", 7),
    ("train", "gradient_accumulation_steps", 2),
    ("train", "lr_scheduler", "cosine"),
    ("train", "mixed_precision", "bf16"),
    ("train", "use_8bit_adam", True),
    ("train", "max_grad_norm", 0.5),
    ("data", "resolution", 32),
    ("data", "random_flip", True),
    ("data", "proportion_empty_prompts", 0.5),
    ("data", "max_samples", 4),
    ("objective", "snr_gamma", 5.0),
    ("objective", "noise_offset", 0.1),
    ("method", "kind", "lora"),
]


@pytest.mark.parametrize(("section", "key", "value"), REFUSED, ids=[f"{s}.{k}" for s, k, _ in REFUSED])
def test_resume_refuses_a_setting_that_changes_the_run(section, key, value, finished_run, tiny_base, circles,
                                                       tmp_path) -> None:
    run = unfinished(copy_run(finished_run, tmp_path))
    config = _config(run, tiny_base, circles, **{section: {key: value}})
    with pytest.raises(ResumeError) as refused:
        plan_run(config)
    message = str(refused.value)
    assert f"{section}.{key}:" in message and "another train.output_dir" in message
    assert json.loads((run / "events.jsonl").read_text().splitlines()[-1])["event"] != "config_changed"


def test_resume_refuses_another_base_and_lists_every_difference(finished_run, tiny_base, circles, tmp_path) -> None:
    run = unfinished(copy_run(finished_run, tmp_path))
    other_base = shutil.copytree(tiny_base, tmp_path / "other-base")
    config = _config(run, other_base, circles, train={"learning_rate": 0.5, "seed": 3})
    with pytest.raises(ResumeError) as refused:
        plan_run(config)
    for key in ("model.pretrained", "train.learning_rate", "train.seed"):
        assert key in str(refused.value)


ALLOWED = [
    ("train", "max_steps", 5),
    ("train", "checkpoint_every", 3),
    ("train", "checkpoints_total_limit", 1),
    ("train", "log_every", 2),
    ("train", "report_to", "tensorboard"),
    ("train", "gradient_checkpointing", True),
    ("data", "num_workers", 1),
    ("validation", "every", 7),
    ("validation", "guidance_scale", 3.0),
    ("hub", "private", True),
]


@pytest.mark.parametrize(("section", "key", "value"), ALLOWED, ids=[f"{s}.{k}" for s, k, _ in ALLOWED])
def test_resume_allows_and_lists_a_setting_that_only_watches_or_saves(section, key, value, finished_run,
                                                                       tiny_base, circles, tmp_path) -> None:
    run = unfinished(copy_run(finished_run, tmp_path))
    config = _config(run, tiny_base, circles, **{section: {key: value}})
    if key == "max_steps":
        config = _config(run, tiny_base, circles, train={"max_steps": 5, "checkpoint_every": 1})
    plan = plan_run(config)
    assert plan.resume_from is not None and plan.resume_from.name == "step-000002"
    assert any(change.startswith(f"{section}.{key}:") for change in plan.changes), plan.changes
    assert f"{section}.{key}" in MAY_CHANGE or section in MAY_CHANGE


def test_max_steps_below_the_checkpoint_is_refused(finished_run, tiny_base, circles, tmp_path) -> None:
    run = unfinished(copy_run(finished_run, tmp_path))
    config = _config(run, tiny_base, circles, train={"max_steps": 1, "checkpoint_every": 1})
    with pytest.raises(ResumeError, match="a run cannot go back"):
        plan_run(config)


def test_a_finished_run_is_not_trained_again(finished_run, tiny_base, circles, tmp_path) -> None:
    run = copy_run(finished_run, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in (run / "final").iterdir()}
    plan = plan_run(_config(run, tiny_base, circles))
    assert plan.finished_at == 2
    from difftune.training.loop import train

    assert train(_config(run, tiny_base, circles)) == run / "final"
    assert before == {p: p.stat().st_mtime_ns for p in (run / "final").iterdir()}


def test_a_finished_run_without_checkpoints_is_not_restarted_from_zero(finished_run, tiny_base, circles,
                                                                        tmp_path) -> None:
    run = copy_run(finished_run, tmp_path)
    shutil.rmtree(run / "checkpoints")
    config = _config(run, tiny_base, circles, train={"max_steps": 4, "checkpoint_every": 1})
    with pytest.raises(ResumeError, match="no checkpoint to continue from"):
        plan_run(config)
    assert (run / "final" / "diffusion_pytorch_model.safetensors").is_file()


def test_switching_the_method_is_refused_before_any_file_is_read(finished_run, tiny_base, circles, tmp_path) -> None:
    run = unfinished(copy_run(finished_run, tmp_path))
    config = _config(run, tiny_base, circles, method={"kind": "full"})
    with pytest.raises(ResumeError, match='method.kind: "controlnet" in the run, "full" now'):
        plan_run(config)


# --- class 3: damaged checkpoints ---------------------------------------------------------


def _damage(checkpoint: Path, how: str) -> None:
    weights = checkpoint / "controlnet" / "diffusion_pytorch_model.safetensors"
    if how == "deleted":
        (checkpoint / "optimizer.bin").unlink()
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "zeroed":
        weights.write_bytes(bytes(weights.stat().st_size))
    elif how == "no_rng":
        for rng in checkpoint.glob("random_states_*.pkl"):
            rng.unlink()
    elif how == "step_999":
        (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 999, "epoch": 0, "samples_in_epoch": 0}))
    elif how == "no_state":
        (checkpoint / "trainer_state.json").unlink()


DAMAGES = ["deleted", "truncated", "zeroed", "no_rng", "step_999", "no_state"]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(how, finished_run, tiny_base, circles,
                                                                  tmp_path) -> None:
    run = unfinished(copy_run(finished_run, tmp_path))
    newest = complete_checkpoints(run)[-1]
    _damage(newest, how)
    assert verify_checkpoint(newest) is not None
    plan = plan_run(_config(run, tiny_base, circles))
    assert plan.resume_from is not None and plan.resume_from.name == "step-000001"
    assert len(plan.skipped) == 1 and "step-000002" in plan.skipped[0]


@pytest.mark.parametrize("how", ["truncated", "zeroed"])
def test_every_checkpoint_damaged_stops_with_a_message(how, finished_run, tiny_base, circles, tmp_path) -> None:
    run = unfinished(copy_run(finished_run, tmp_path))
    for checkpoint in complete_checkpoints(run):
        _damage(checkpoint, how)
    with pytest.raises(ResumeError, match="every checkpoint .* is damaged"):
        plan_run(_config(run, tiny_base, circles))


def test_a_damaged_checkpoint_named_explicitly_is_refused(finished_run, tiny_base, circles, tmp_path) -> None:
    run = unfinished(copy_run(finished_run, tmp_path))
    _damage(run / "checkpoints" / "step-000002", "zeroed")
    with pytest.raises(ResumeError, match="step-000002 is damaged"):
        plan_run(_config(run, tiny_base, circles, train={"resume": "step-000002"}))


def test_resume_after_fallback_trains_to_the_same_weights(finished_run, tiny_base, circles, tmp_path) -> None:
    """Falling back one checkpoint redoes a step; the result is the finished run's, bit for bit."""
    import torch
    from safetensors.torch import load_file

    from difftune.training.loop import train

    run = unfinished(copy_run(finished_run, tmp_path))
    _damage(run / "checkpoints" / "step-000002", "truncated")
    assert train(_config(run, tiny_base, circles)) == run / "final"
    name = "diffusion_pytorch_model.safetensors"
    expected, resumed = load_file(finished_run / "final" / name), load_file(run / "final" / name)
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "checkpoint_skipped" for e in events)


def test_a_finished_run_asked_for_fewer_steps_says_it_kept_the_result(finished_run, tiny_base, circles, tmp_path,
                                                                       capsys) -> None:
    from difftune.cli import main
    from difftune.config import to_toml

    run = copy_run(finished_run, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in (run / "final").iterdir()}
    path = tmp_path / "fewer.toml"
    path.write_text(to_toml(_config(run, tiny_base, circles, train={"max_steps": 1, "checkpoint_every": 1})))
    assert main(["train", str(path)]) == 0
    said = " ".join(capsys.readouterr().err.split())  # the console folds long lines
    assert "finished at step 2" in said and "train.max_steps = 1 is below that" in said, said
    assert "step-000001 holds the weights of step 1" in said
    assert before == {p: p.stat().st_mtime_ns for p in (run / "final").iterdir()}
