"""The data verbs (prepare, condition, caption) on inputs a reviewer broke them with: a NUL
byte in a name, links that loop, text that is not UTF-8, an OUT that is a link, files the
user put into OUT, a missing --model, and metadata that training reads otherwise. Each is
one sentence naming the file, row or flag (exit 2, never a traceback), and nothing is
written before a refusal."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difftune.cli import main
from difftune.data.build.prepare import prepare
from difftune.errors import UserError


def _noise(path: Path, seed: int, size: tuple[int, int] = (64, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _tree(folder: Path) -> dict[str, str]:
    return {f.relative_to(folder).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file() and not f.is_symlink()}


def _write_rows(folder: Path, rows: list[dict]) -> None:
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def _refused(capsys: pytest.CaptureFixture, argv: list, *expected: str) -> str:
    """The CLI exits 2 with one `error: ...` line holding every `expected` text."""
    capsys.readouterr()  # what earlier steps printed
    assert main([str(a) for a in argv]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and len(error.splitlines()) == 1, error
    assert "Traceback" not in error and all(text in error for text in expected), error
    return error


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    folder = tmp_path / "raw"
    for index in range(3):
        _noise(folder / f"{index}.png", seed=index)
        (folder / f"{index}.txt").write_text(f"caption {index}")
    return folder


@pytest.fixture
def dataset(raw: Path, tmp_path: Path) -> Path:
    """A dataset `prepare` wrote (what condition and caption take)."""
    prepare(raw, tmp_path / "data", workers=1)
    return tmp_path / "data"


def _verbs(data: Path, out: Path) -> list[list]:
    """condition and caption on `data`, each with a model that is never loaded."""
    return [["data", "condition", data, out, "--kind", "canny", "--workers", "1"],
            ["data", "caption", data, "--model", out.parent / "no-model", "--overwrite"]]


# --- F1: a NUL byte in a name ---------------------------------------------------------


@pytest.mark.parametrize("key", ["file_name", "conditioning_image_file_name"])
def test_a_nul_byte_in_a_metadata_name_is_a_sentence_naming_the_row(raw: Path, tmp_path: Path, key: str,
                                                                    capsys: pytest.CaptureFixture) -> None:
    rows = [{"file_name": "0.png", "conditioning_image_file_name": "1.png"},
            {"file_name": "1.png", "conditioning_image_file_name": "2.png"}]
    rows[1][key] = "1\x00.png"
    _write_rows(raw, rows)
    _refused(capsys, ["data", "prepare", raw, tmp_path / "out"], "row 2", key, "NUL")
    assert not (tmp_path / "out").exists()


def test_a_nul_byte_in_a_dataset_row_stops_condition_and_caption(dataset: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    _write_rows(dataset, _rows(dataset) + [{"file_name": "images/x\x00.png", "text": "x"}])
    before = _tree(dataset)
    for argv in _verbs(dataset, tmp_path / "out"):
        _refused(capsys, argv, "row 4: file_name", "NUL")
    assert not (tmp_path / "out").exists() and _tree(dataset) == before


# --- F2: links that loop --------------------------------------------------------------


def test_links_that_loop_inside_in_are_dropped_by_prepare_with_their_reason(raw: Path, tmp_path: Path) -> None:
    os.symlink("self.png", raw / "self.png")  # a link to itself
    os.symlink("b.png", raw / "a.png")
    os.symlink("a.png", raw / "b.png")  # a -> b -> a
    (raw / "2.txt").unlink()
    os.symlink("2.txt", raw / "2.txt")  # 2.png's caption file loops
    os.symlink("loops", raw / "loops")  # folders that loop: not walked into
    (raw / "sub").mkdir()
    os.symlink("..", raw / "sub" / "up")
    hints = tmp_path / "hints"
    for index in range(2):
        _noise(hints / f"{index}.png", seed=10 + index)
    os.symlink("2.png", hints / "2.png")  # 2.png's conditioning image loops
    for conditioning in (None, hints):
        out = tmp_path / ("out" if conditioning is None else "paired")
        report = prepare(raw, out, conditioning=conditioning, workers=1)
        dropped = {d["file"]: (d["reason"], d["detail"]) for d in report["dropped"]}
        for name in ("self.png", "a.png", "b.png"):
            assert dropped[name][0] == "unreadable" and "symbolic links" in dropped[name][1], dropped
        assert dropped["2.png"][0] == ("bad_caption" if conditioning is None else "unreadable"), dropped
        assert "symbolic links" in dropped["2.png"][1]
    assert main(["data", "prepare", str(raw), str(tmp_path / "cli")]) == 0


def test_a_row_whose_file_loops_stops_condition_and_caption_naming_it(dataset: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    os.symlink("loop.png", dataset / "images" / "loop.png")
    _write_rows(dataset, _rows(dataset) + [{"file_name": "images/loop.png", "text": "x"}])
    for argv in _verbs(dataset, tmp_path / "out"):
        _refused(capsys, argv, "row 4: file_name 'images/loop.png'", "symbolic links")
    assert not (tmp_path / "out").exists()


def test_a_bookkeeping_folder_that_leads_nowhere_is_named(dataset: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (dataset / ".difftune").rename(tmp_path / "kept")
    os.symlink(".difftune", dataset / ".difftune")  # a link to itself
    _refused(capsys, ["data", "caption", dataset, "--model", model, "--overwrite"],
             f"{dataset / '.difftune'} is not a folder")


def test_caption_never_writes_through_a_link_in_its_bookkeeping(dataset: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    for name in ("caption-journal.jsonl", "metadata.before-caption.jsonl"):
        os.symlink(victim, dataset / ".difftune" / name)
        _refused(capsys, ["data", "caption", dataset, "--model", model, "--overwrite"],
                 f".difftune/{name} is a link that points outside IN")
        (dataset / ".difftune" / name).unlink()
    assert victim.read_text() == "mine"


# --- names that are not UTF-8 ----------------------------------------------------------


def test_a_file_name_that_is_not_utf8_is_dropped_with_its_reason(raw: Path, tmp_path: Path) -> None:
    name = os.fsdecode(b"caf\xe9.png")
    _noise(raw / name, seed=7)
    report = prepare(raw, tmp_path / "out", workers=1)
    assert [(d["file"], d["reason"]) for d in report["dropped"]] == [(name, "bad_name")]
    assert len(_rows(tmp_path / "out")) == 3


def test_json_escapes_that_utf8_cannot_hold_are_named_or_kept(raw: Path, dataset: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    (raw / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a \\udcff"}\n'
                                        '{"file_name": "1.png", "text": "fine"}\n')
    report = prepare(raw, tmp_path / "out", workers=1)
    assert [(d["file"], d["reason"]) for d in report["dropped"]] == [("0.png", "bad_caption")]
    assert "row 1: text is not UTF-8 text" in report["dropped"][0]["detail"]
    (raw / "metadata.jsonl").write_text('{"file_name": "\\udcff.png"}\n')
    _refused(capsys, ["data", "prepare", raw, tmp_path / "other"], "row 1: file_name", "not UTF-8 text")
    rows = _rows(dataset)
    rows[0]["text"] = "a \udcff"
    (dataset / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["data", "condition", str(dataset), str(tmp_path / "canny"), "--kind", "canny"]) == 0
    assert _rows(tmp_path / "canny")[0]["text"] == "a \udcff"  # passed on as it came, escaped


# --- F3: text that is not UTF-8 -------------------------------------------------------


@pytest.mark.parametrize("name", ["metadata.jsonl", "metadata.csv", "captions.csv", "captions.jsonl"])
def test_a_table_that_is_not_utf8_is_a_sentence_naming_file_and_line(raw: Path, tmp_path: Path, name: str,
                                                                      capsys: pytest.CaptureFixture) -> None:
    if name.endswith(".csv"):
        text = b"file_name,text\n0.png,a cat\n1.png,caf\xe9\n"
    else:
        text = b'{"file_name": "0.png", "text": "a cat"}\n{"file_name": "1.png", "text": "caf\xe9"}\n'
    (tmp_path / name if name.startswith("captions") else raw / name).write_bytes(text)
    extra = ["--captions", tmp_path / name] if name.startswith("captions") else []
    file = tmp_path / name if extra else raw / name
    _refused(capsys, ["data", "prepare", raw, tmp_path / "out", *extra],
             f"{file}, line {3 if name.endswith('.csv') else 2} is not UTF-8 text (byte 0xe9",
             "save the file as UTF-8")
    assert not (tmp_path / "out").exists()


def test_a_dataset_metadata_that_is_not_utf8_stops_condition_and_caption(dataset: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    with open(dataset / "metadata.jsonl", "ab") as handle:
        handle.write(b'{"file_name": "images/0.png", "text": "\xff"}\n')
    for argv in _verbs(dataset, tmp_path / "out"):
        _refused(capsys, argv, "metadata.jsonl, line 4 is not UTF-8 text (byte 0xff")
    assert not (tmp_path / "out").exists()


# --- F4, F5: an OUT that is a link ----------------------------------------------------


@pytest.mark.parametrize("target", ["empty", "earlier", "dangling", "loop"])
def test_an_out_that_is_a_link_is_refused_before_any_work(raw: Path, dataset: Path, tmp_path: Path, target: str,
                                                          capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "link"
    folder = tmp_path / "folder"
    if target == "empty":
        folder.mkdir()
    elif target == "earlier":
        prepare(raw, folder, workers=1)
    os.symlink("link" if target == "loop" else folder, out)
    before = _tree(folder) if folder.exists() else None
    argvs = [["data", "prepare", raw, out, "--workers", "1"], ["data", "prepare", raw, out, "--format", "hf"],
             ["data", "condition", dataset, out, "--kind", "canny"]]
    for argv in argvs:
        _refused(capsys, argv, f"OUT = '{out}' is a link")
        assert out.is_symlink() and (_tree(folder) if folder.exists() else None) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["raw", "data", "link"] + (
            ["folder"] if folder.exists() else []))  # no hidden replacement beside it


# --- F6: files the user put into OUT ---------------------------------------------------


@pytest.mark.parametrize("change", ["added", "edited", "folder"])
def test_prepare_again_refuses_an_out_holding_files_it_did_not_write(raw: Path, tmp_path: Path, change: str,
                                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    prepare(raw, out, workers=1)
    if change == "added":
        (out / "images" / "notes.txt").write_text("mine")
        name = "images/notes.txt"
    elif change == "edited":
        (out / "metadata.jsonl").write_text((out / "metadata.jsonl").read_text().replace("caption 1", "fixed"))
        name = "metadata.jsonl"
    else:
        (out / "mine").mkdir()
        name = "mine"
    before = _tree(out)
    for again in (["--workers", "1"], ["--format", "webdataset"], ["--min-size", "40"]):
        _refused(capsys, ["data", "prepare", raw, out, *again], f"OUT = '{out}' holds {name}",
                 "did not write" if change != "edited" else "changed since")
        assert _tree(out) == before and (out / name).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]


def test_condition_again_refuses_an_out_holding_files_it_did_not_write(dataset: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "canny"
    assert main(["data", "condition", str(dataset), str(out), "--kind", "canny", "--workers", "1"]) == 0
    (out / "notes.txt").write_text("mine")
    for again in ([], ["--low", "10"]):
        _refused(capsys, ["data", "condition", dataset, out, "--kind", "canny", "--workers", "1", *again],
                 f"OUT = '{out}' holds notes.txt")
    assert (out / "notes.txt").read_text() == "mine"


def test_difftunes_own_output_is_still_replaced_whole(raw: Path, dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    for settings in ({}, {"form": "webdataset"}, {"form": "webdataset"}, {"form": "hf"}, {}):
        prepare(raw, out, workers=1, **settings)
    assert sorted(p.name for p in out.iterdir()) == [".difftune", "images", "metadata.jsonl"]
    (out / "cache-0123.arrow").write_text("not datasets' cache: no state.json here")
    with pytest.raises(UserError, match=r"holds cache-0123\.arrow, which difftune did not write"):
        prepare(raw, out, workers=1)


def test_the_caches_datasets_writes_beside_a_saved_dataset_are_not_the_users(raw: Path, tmp_path: Path) -> None:
    import datasets

    out = tmp_path / "hf"
    prepare(raw, out, form="hf", workers=1)
    datasets.load_from_disk(str(out)).shuffle(seed=0).flatten_indices()  # writes cache-*.arrow into OUT
    assert list(out.glob("cache-*.arrow"))
    prepare(raw, out, form="webdataset", workers=1)
    assert sorted(p.name for p in out.iterdir()) == [".difftune", "shard-00000.tar"]


# --- F10: a missing --model -----------------------------------------------------------


@pytest.mark.parametrize("model", ["missing", "no-config"])
def test_a_missing_model_is_refused_before_anything_is_written(dataset: Path, tmp_path: Path, model: str,
                                                               capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / model
    if model == "no-config":
        folder.mkdir()
        (folder / "notes.txt").write_text("not a model")
    before = _tree(dataset)
    expected = "no such folder" if model == "missing" else "no config.json"
    _refused(capsys, ["data", "condition", dataset, tmp_path / "out", "--kind", "depth", "--model", folder],
             f"--model '{folder}'", expected)
    assert not (tmp_path / "out").exists()
    _refused(capsys, ["data", "caption", dataset, "--model", folder, "--overwrite"], f"--model '{folder}'", expected)
    assert _tree(dataset) == before


# --- F11: metadata as training reads it -----------------------------------------------


def test_a_metadata_csv_with_a_byte_order_mark_is_read(raw: Path, tmp_path: Path) -> None:
    (raw / "metadata.csv").write_bytes("file_name,text\n0.png,a cat\n1.png,a dog\n".encode("utf-8-sig"))
    report = prepare(raw, tmp_path / "out", workers=1)
    assert report["counts"]["kept"] == 2
    assert [row["text"] for row in _rows(tmp_path / "out")] == ["a cat", "a dog"]


@pytest.mark.parametrize("verb", ["prepare", "condition", "caption"])
def test_a_file_name_naming_the_folder_itself_is_said_so(raw: Path, dataset: Path, tmp_path: Path, verb: str,
                                                         capsys: pytest.CaptureFixture) -> None:
    folder = raw if verb == "prepare" else dataset
    rows = [{"file_name": "0.png"}] if verb == "prepare" else _rows(dataset)
    _write_rows(folder, rows + [{"file_name": "./", "text": "x"}])
    argv = {"prepare": ["data", "prepare", raw, tmp_path / "out"], "condition": _verbs(dataset, tmp_path / "out")[0],
            "caption": _verbs(dataset, tmp_path / "out")[1]}[verb]
    error = _refused(capsys, argv, f"row {len(rows) + 1}: file_name './' names the folder", "not a file")
    assert "outside" not in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [7, ["a.png"], {"path": "a.png"}, True])
def test_a_conditioning_image_that_is_not_a_name_is_a_sentence_naming_the_row(
        raw: Path, tmp_path: Path, value: object, capsys: pytest.CaptureFixture) -> None:
    _write_rows(raw, [{"file_name": "0.png", "conditioning_image": "1.png"},
                      {"file_name": "1.png", "conditioning_image": value}])
    _refused(capsys, ["data", "prepare", raw, tmp_path / "out"], "row 2: conditioning_image", "not a file name")
    assert not (tmp_path / "out").exists()


def test_a_caption_that_is_not_text_drops_its_image_with_the_row(raw: Path, tmp_path: Path) -> None:
    _write_rows(raw, [{"file_name": "0.png", "text": "a cat"}, {"file_name": "1.png", "text": 12}])
    report = prepare(raw, tmp_path / "out", workers=1)
    assert [(d["file"], d["reason"]) for d in report["dropped"]] == [("1.png", "bad_caption")]
    assert "row 2: text is a number, not text" in report["dropped"][0]["detail"]


@pytest.mark.parametrize("verb", ["prepare", "condition", "caption"])
def test_two_metadata_files_are_refused_as_training_refuses_them(raw: Path, dataset: Path, tmp_path: Path,
                                                                  verb: str, capsys: pytest.CaptureFixture) -> None:
    folder = raw if verb == "prepare" else dataset
    _write_rows(folder, [{"file_name": "images/0.png" if folder == dataset else "0.png", "text": "a"}])
    (folder / "metadata.csv").write_text("file_name,text\n0.png,b\n")
    argv = {"prepare": ["data", "prepare", raw, tmp_path / "out"], "condition": _verbs(dataset, tmp_path / "out")[0],
            "caption": _verbs(dataset, tmp_path / "out")[1]}[verb]
    _refused(capsys, argv, f"IN = '{folder}' holds both metadata.csv and metadata.jsonl")
    assert not (tmp_path / "out").exists()
