"""A checkpoint may come from anywhere (a download, a shared disk, a hand that edited it):
whatever is wrong with its records (trainer_state.json, engine.json, MANIFEST.json) makes
it a damaged checkpoint, passed over to the one before with a line, or one sentence when
it was named; a link, a pickle difftune does not write or a pickled DCP index that names
code is refused unread; and train.resume never trains over newer checkpoints.

Each case starts from a copy of a finished 2-step run (a checkpoint at steps 1 and 2);
an edit rewrites the manifest to match, since whoever crafts a checkpoint can craft its
checksums too."""

import json
import pickle
import shutil
from pathlib import Path

import pytest
from conftest import copy_run, run_config, unfinished
from test_checkpoint_trust import _Payload

from difftune.cli import main
from difftune.config import build_config, to_toml
from difftune.files import crc32
from difftune.training.checkpoint import (
    MANIFEST,
    ResumeError,
    refuse_unsafe_files,
    verify_checkpoint,
)
from difftune.training.plan import finished_message, plan_run


def _config(run: Path, base: Path, data_dir: Path, **train):
    raw = run_config(base, data_dir, run, train={"max_steps": 2, "checkpoint_every": 1, **train})
    raw["validation"] = {"every": 100}
    return build_config(raw)


@pytest.fixture()
def run(finished_run: Path, tmp_path: Path) -> Path:
    return unfinished(copy_run(finished_run, tmp_path))


def _newest(run: Path) -> Path:
    return run / "checkpoints" / "step-000002"


def _manifest_entry(checkpoint: Path, name: str) -> None:
    """Record `name` as it is now in the checkpoint's manifest."""
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    file = checkpoint / name
    manifest["files"][name] = {"bytes": file.stat().st_size, "crc32": crc32(file)}
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


def _rewrite(checkpoint: Path, name: str, data: bytes) -> None:
    (checkpoint / name).parent.mkdir(parents=True, exist_ok=True)
    (checkpoint / name).write_bytes(data)
    _manifest_entry(checkpoint, name)


def _falls_back(run: Path, base: Path, data_dir: Path, said: str) -> None:
    newest = _newest(run)
    problem = verify_checkpoint(newest)
    assert problem is not None and said in problem, problem
    plan = plan_run(_config(run, base, data_dir))
    assert plan.resume_from is not None and plan.resume_from.name == "step-000001"
    assert len(plan.skipped) == 1 and "step-000002" in plan.skipped[0] and said in plan.skipped[0]


# --- finding 3: trainer_state.json and engine.json as a damaged checkpoint ------------------


STATES = {"text": {"step": "2", "epoch": 0, "samples_in_epoch": 0},
          "float": {"step": 2.0, "epoch": 0, "samples_in_epoch": 0},
          "bool": {"step": 2, "epoch": True, "samples_in_epoch": 0},
          "negative": {"step": 2, "epoch": 0, "samples_in_epoch": -4},
          "list": [2, 0, 0]}


@pytest.mark.parametrize("how", STATES)
def test_a_trainer_state_of_other_types_is_a_damaged_checkpoint(how, run, tiny_base, circles) -> None:
    _rewrite(_newest(run), "trainer_state.json", json.dumps(STATES[how]).encode())
    _falls_back(run, tiny_base, circles, "trainer_state.json")


ENGINES = {"truncated": b'{"processes": 1, "eng', "no_processes": b'{"engine": "single"}',
           "text_processes": b'{"processes": "1", "engine": "single"}', "list": b"[1]"}


@pytest.mark.parametrize("how", ENGINES)
def test_an_engine_record_that_does_not_read_is_a_damaged_checkpoint(how, run, tiny_base, circles) -> None:
    _rewrite(_newest(run), "engine.json", ENGINES[how])
    _falls_back(run, tiny_base, circles, "engine.json")


def test_a_damaged_engine_record_named_explicitly_is_one_sentence(run, tiny_base, circles) -> None:
    _rewrite(_newest(run), "engine.json", ENGINES["no_processes"])
    with pytest.raises(ResumeError, match="step-000002 is damaged .*engine.json"):
        plan_run(_config(run, tiny_base, circles, resume="step-000002"))


def test_data_json_that_is_not_an_object_is_a_damaged_checkpoint(run, tiny_base, circles) -> None:
    _rewrite(_newest(run), "data.json", b"[]")
    _falls_back(run, tiny_base, circles, "data.json")


# --- finding 4: the manifest --------------------------------------------------------------


def test_a_checkpoint_without_its_manifest_is_damaged(run, tiny_base, circles) -> None:
    (_newest(run) / MANIFEST).unlink()
    _falls_back(run, tiny_base, circles, MANIFEST)


def test_a_checkpoint_of_a_difftune_before_manifests_is_still_resumed(run, tiny_base, circles) -> None:
    """What a difftune before 2026-12-01 wrote: no manifest, and none of the records
    introduced with it (config.toml, engine.json, data.json)."""
    for name in (MANIFEST, "config.toml", "engine.json", "data.json"):
        (_newest(run) / name).unlink()
    assert verify_checkpoint(_newest(run)) is None


MANIFESTS = {"files_list": {"files": ["optimizer.bin"]}, "entry_text": {"files": {"optimizer.bin": "12 bytes"}},
             "no_files": {"fils": {}}}


@pytest.mark.parametrize("how", MANIFESTS)
def test_a_manifest_of_another_shape_is_a_damaged_checkpoint(how, run, tiny_base, circles) -> None:
    (_newest(run) / MANIFEST).write_text(json.dumps(MANIFESTS[how]))
    _falls_back(run, tiny_base, circles, MANIFEST)


def test_a_manifest_naming_a_file_outside_the_checkpoint_is_damaged(run, tiny_base, circles) -> None:
    """The run's own config.toml, two folders up: the manifest is right about it, but a
    checkpoint's files are inside it."""
    newest = _newest(run)
    manifest = json.loads((newest / MANIFEST).read_text())
    outside = run / "config.toml"
    manifest["files"]["../../config.toml"] = {"bytes": outside.stat().st_size, "crc32": crc32(outside)}
    (newest / MANIFEST).write_text(json.dumps(manifest))
    _falls_back(run, tiny_base, circles, "../../config.toml")


# --- finding 9: links, pickles difftune does not write, DCP's pickled index -----------------


@pytest.mark.parametrize("what", ["file", "folder"])
def test_a_link_inside_a_checkpoint_is_a_damaged_checkpoint(what, run, tiny_base, circles, tmp_path) -> None:
    """The link's target has the very bytes the manifest records: only the link is wrong."""
    newest = _newest(run)
    name = "optimizer.bin" if what == "file" else "controlnet"
    outside = tmp_path / "outside" / name
    outside.parent.mkdir()
    shutil.move(newest / name, outside)
    (newest / name).symlink_to(outside)
    _falls_back(run, tiny_base, circles, "link")


@pytest.mark.parametrize("name", ["controlnet/diffusion_pytorch_model.bin", "extra.pt", "pytorch_model.bin",
                                  "optimizer.ckpt"])
def test_a_pickle_difftune_does_not_write_is_refused_by_any_name(name, run, tiny_base, circles, tmp_path) -> None:
    marker = tmp_path / "code-ran"
    _rewrite(_newest(run), name, pickle.dumps(_Payload(marker)))
    _falls_back(run, tiny_base, circles, name)
    with pytest.raises(ResumeError, match="pickle"):
        refuse_unsafe_files(_newest(run))
    assert not marker.exists()


def test_a_crafted_optimizer_state_says_what_is_wrong(run, tiny_base, circles, tmp_path) -> None:
    """accelerate reads optimizer.bin with torch's restricted unpickler, which refuses the
    payload: the message names the file and the refused pickle, not "another setup"."""
    from difftune.training.loop import Run

    marker = tmp_path / "code-ran"
    _rewrite(_newest(run), "optimizer.bin", pickle.dumps(_Payload(marker)))
    with pytest.raises(ResumeError) as refused:
        Run(_config(run, tiny_base, circles)).fit()
    message = str(refused.value)
    assert "optimizer.bin" in message and "another setup" not in message and "pickle" in message, message
    assert not marker.exists()


def _dcp_index(folder: Path) -> Path:
    """A sharded state as accelerate writes it under FSDP2 (torch.distributed.checkpoint:
    .distcp data and a pickled .metadata index), of a small model and its optimizer."""
    import torch
    import torch.distributed.checkpoint as dcp

    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=True)
    return folder / ".metadata"


def _with_dcp_index(checkpoint: Path, index: bytes | None = None) -> Path:
    folder = checkpoint / "pytorch_model_fsdp_0"
    written = _dcp_index(folder)
    if index is not None:
        written.write_bytes(index)
    for file in folder.iterdir():
        _manifest_entry(checkpoint, str(file.relative_to(checkpoint)))
    return written


def test_a_sharded_state_as_dcp_writes_it_is_sound(run) -> None:
    _with_dcp_index(_newest(run))
    assert verify_checkpoint(_newest(run)) is None
    refuse_unsafe_files(_newest(run))


# pathlib.PosixPath, then BUILD with (None, {"crafted": 1}): pickle.load would set an
# attribute on the class itself, for the whole process.
STATE_ON_A_CLASS = b"\x80\x02cpathlib\nPosixPath\nN}X\x07\x00\x00\x00craftedK\x01s\x86b."


@pytest.mark.parametrize("crafted", ["payload", "state_on_a_class"])
def test_a_crafted_dcp_index_is_refused_unread(crafted, run, tiny_base, circles, tmp_path) -> None:
    """torch.distributed.checkpoint reads .metadata with pickle.load, which runs what it
    names: difftune checks the pickle names only DCP's own records first."""
    import pathlib

    marker = tmp_path / "code-ran"
    index = pickle.dumps(_Payload(marker)) if crafted == "payload" else STATE_ON_A_CLASS
    _with_dcp_index(_newest(run), index)
    _falls_back(run, tiny_base, circles, "pytorch_model_fsdp_0/.metadata")
    with pytest.raises(ResumeError, match="pytorch_model_fsdp_0/.metadata"):
        refuse_unsafe_files(_newest(run))
    assert not marker.exists() and not hasattr(pathlib.PosixPath, "crafted")


def test_a_dcp_index_pointing_outside_its_folder_is_refused(run, tiny_base, circles, tmp_path) -> None:
    index = _dcp_index(tmp_path / "dcp")
    metadata = pickle.loads(index.read_bytes())  # the test's own file
    for info in metadata.storage_data.values():
        info.relative_path = "../../../../config.toml"
    _with_dcp_index(_newest(run), pickle.dumps(metadata))
    _falls_back(run, tiny_base, circles, "outside")


# --- findings 5 and 6: what train.resume names ------------------------------------------------


def test_resume_naming_an_older_checkpoint_refuses_to_train_over_newer_ones(run, tiny_base, circles) -> None:
    with pytest.raises(ResumeError) as refused:
        plan_run(_config(run, tiny_base, circles, resume="step-000001"))
    message = str(refused.value)
    assert str(_newest(run)) in message and '"latest"' in message and "delete" in message, message


def test_resume_from_the_cli_refuses_the_same_way(run, tiny_base, circles, tmp_path, capsys) -> None:
    path = tmp_path / "run.toml"
    path.write_text(to_toml(_config(run, tiny_base, circles)))
    assert main(["train", str(path), "--resume", "step-000001"]) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert said.startswith("error:") and "step-000002" in said and "Traceback" not in said, said


def test_resume_naming_the_newest_checkpoint_continues(run, tiny_base, circles) -> None:
    plan = plan_run(_config(run, tiny_base, circles, resume="step-000002"))
    assert plan.resume_from == _newest(run)


def test_resume_naming_an_older_checkpoint_passes_over_damaged_newer_ones(run, tiny_base, circles) -> None:
    """A damaged newer checkpoint is no work to keep: "latest" would pass over it too."""
    weights = _newest(run) / "controlnet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(bytes(weights.stat().st_size))
    plan = plan_run(_config(run, tiny_base, circles, resume="step-000001"))
    assert plan.resume_from is not None and plan.resume_from.name == "step-000001"


def test_a_bare_checkpoint_name_is_looked_up_in_the_run_not_the_current_folder(run, tiny_base, circles, tmp_path,
                                                                               monkeypatch) -> None:
    decoy = tmp_path / "elsewhere" / "step-000002"
    decoy.mkdir(parents=True)
    (decoy / "COMPLETE").write_text("")
    monkeypatch.chdir(decoy.parent)
    plan = plan_run(_config(run, tiny_base, circles, resume="step-000002"))
    assert plan.resume_from == _newest(run)


def test_a_relative_path_is_a_path_and_shown_whole(run, tiny_base, circles, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ResumeError) as refused:
        plan_run(_config(run, tiny_base, circles, resume="old/step-000002"))
    assert str(tmp_path / "old" / "step-000002") in str(refused.value) and "does not exist" in str(refused.value)


def test_a_missing_checkpoint_name_shows_where_it_was_looked_for(run, tiny_base, circles) -> None:
    with pytest.raises(ResumeError) as refused:
        plan_run(_config(run, tiny_base, circles, resume="step-000009"))
    assert str(run / "checkpoints" / "step-000009") in str(refused.value)


# --- a finished run asked for fewer steps ------------------------------------------------------


def test_a_finished_run_asked_for_fewer_steps_names_a_kept_earlier_result(finished_run, tiny_base, circles,
                                                                          tmp_path) -> None:
    """final-step-N: the final/ of the run when it finished at N, kept when it trained on."""
    run = copy_run(finished_run, tmp_path)
    shutil.copytree(run / "final", run / "final-step-000001")
    plan = plan_run(_config(run, tiny_base, circles, max_steps=1))
    said = finished_message(plan)
    assert str(run / "final-step-000001") in said, said
