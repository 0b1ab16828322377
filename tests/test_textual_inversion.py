"""Textual inversion on the tiny SD and SDXL bases: only the new rows train, final/ holds
the learned_embeds files diffusers' load_textual_inversion reads and renders as the
trained model does, a resumed run equals an unbroken one, and what cannot be trained is
named before a step runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import WORDS, run_config
from diffusers import (
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UniPCMultistepScheduler,
)
from safetensors.torch import load_file

from difftune.config import ConfigError, build_config
from difftune.data.sources import DataError
from difftune.data.synthetic import fill_circles_rows
from difftune.data.training import open_training_data
from difftune.families import get_family
from difftune.methods import make_method
from difftune.methods.full.method import generate_text_to_image
from difftune.results import RESULTS
from difftune.families.sdxl.tiny import build_tiny_sdxl
from difftune.training.loop import Run

TOKEN = "<blob>"
TRAINED = f"red {TOKEN} with blue background"
INITIAL = "red circle with blue background"  # the same prompt with the init word
RENDER = {"num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np"}


def ti(**settings: Any) -> dict[str, Any]:
    return {"kind": "textual_inversion", "textual_inversion": {
        "token": TOKEN, "init_token": "circle", "caption": "red {token} with blue background", **settings}}


def ti_config(base: Path, data: Path, out: Path, family: str = "sd", **train: Any) -> dict[str, Any]:
    raw = run_config(base, data, out, method=ti(),
                     train={"learning_rate": 5e-2, "max_steps": 4, "checkpoint_every": 2, **train},
                     validation={"prompts": [TRAINED], "every": 2, "steps": 2})
    raw["model"]["family"] = family
    return raw


def render(pipe: Any, prompt: str) -> np.ndarray:
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **RENDER).images[0]


def in_memory(run: Run, prompt: str) -> np.ndarray:
    trainee = run.trainee
    with torch.no_grad():
        images = generate_text_to_image(trainee.family, trainee.parts, run._whole_modules(), prompt, None, RENDER,
                                        torch.Generator().manual_seed(0))
    return np.asarray(images)[0]


def token_folder(root: Path, count: int) -> Path:
    """Fill-circles images whose own captions name the token ("red <blob> with ...")."""
    rows = fill_circles_rows(count, 64, 3, ["red", "blue", "green", "yellow"])
    root.mkdir(parents=True)
    for index, (image, caption) in enumerate(zip(rows["image"], rows["text"])):
        image.save(root / f"{index:03d}.png")
        (root / f"{index:03d}.txt").write_text(caption.replace("circle", TOKEN))
    return root


@pytest.fixture(scope="module")
def sd_run(tiny_base: Path, circles: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    run = Run(build_config(ti_config(tiny_base, circles, tmp_path_factory.mktemp("ti") / "run")))
    run.fit()
    return run


def test_the_embedding_loads_in_diffusers_and_renders_as_trained(sd_run: Run, tiny_base: Path) -> None:
    final = sd_run.run_dir / "final"
    state = load_file(final / "learned_embeds.safetensors")
    assert list(state) == [TOKEN] and state[TOKEN].shape == (1, 32) and state[TOKEN].dtype == torch.float32
    assert sorted(p.name for p in final.iterdir() if not p.name.startswith(".")) == ["learned_embeds.safetensors"]
    assert (sd_run.run_dir / "validation" / "step-000002" / "pair-00-grid.png").is_file()
    base = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None, requires_safety_checker=False)
    before = render(base, INITIAL)  # the token starts as the init word
    RESULTS["embedding"].attach(get_family("sd"), base, final)
    after = render(base, TRAINED)
    assert np.abs(after - before).max() > 1e-3, "the embedding changed nothing"
    assert np.abs(in_memory(sd_run, TRAINED) - after).max() < 1e-5
    assert np.array_equal(render(base, INITIAL), before)  # the base's own words are untouched
    usage = sd_run.trainee.method.usage(get_family("sd"), "me/blob", "tiny")
    assert "load_textual_inversion" in usage and f'pipe("red {TOKEN} with blue background")' in usage


def test_only_the_new_rows_train(sd_run: Run, tiny_base: Path) -> None:
    encoder = sd_run.accelerator.unwrap_model(sd_run.trainee.trained["text_encoder"])
    trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0].endswith("embeddings.token_embedding.added")
    base = load_file(tiny_base / "text_encoder" / "model.safetensors")
    state = encoder.state_dict()
    new = state.pop(trainable[0])
    renamed = {key.replace("token_embedding.original.", "token_embedding."): value for key, value in state.items()}
    assert renamed.keys() == base.keys()
    assert all(torch.equal(value, base[key]) for key, value in renamed.items())
    rows = renamed[trainable[0].replace(".added", ".weight")]
    initial = rows[sd_run.trainee.parts.components["tokenizer"].convert_tokens_to_ids("circle</w>")]
    assert new.shape == (1, 32) and not torch.equal(new[0], initial)
    for part, file in (("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors")):
        saved = load_file(tiny_base / part / file)
        now = sd_run.trainee.parts.components[part].state_dict()
        assert now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in saved), part
    checkpoint = sd_run.run_dir / "checkpoints" / "step-000004" / "text_encoder"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["learned_embeds.safetensors"]


def test_a_resumed_run_equals_an_unbroken_one(tiny_base: Path, tmp_path: Path) -> None:
    """Two vectors, the dataset's own captions (the token spelled out as its two tokens)."""
    data = token_folder(tmp_path / "data", 6)

    def config(out: str, steps: int) -> dict[str, Any]:
        raw = ti_config(tiny_base, data, tmp_path / out, max_steps=steps, checkpoint_every=1, batch_size=4)
        del raw["method"]["textual_inversion"]["caption"]
        raw["method"]["textual_inversion"]["vectors"] = 2
        return raw

    Run(build_config(config("a", 3))).fit()
    Run(build_config(config("b", 1))).fit()
    resumed = Run(build_config(config("b", 3)))
    assert resumed.resume_from is not None and resumed.resume_from.name == "step-000001"
    resumed.fit()
    a, b = (load_file(tmp_path / out / "final" / "learned_embeds.safetensors") for out in ("a", "b"))
    assert list(a) == list(b) == [TOKEN] and a[TOKEN].shape == (2, 32)
    assert torch.equal(a[TOKEN], b[TOKEN])
    assert not torch.equal(a[TOKEN][0], a[TOKEN][1])  # each vector learns its own


def test_sdxl_trains_both_encoders_and_loads_in_its_pipeline(circles: Path, tmp_path: Path) -> None:
    base = build_tiny_sdxl(tmp_path / "sdxl", WORDS, seed=0)
    raw = ti_config(base, circles, tmp_path / "run", family="sdxl", max_steps=2)
    raw["method"]["textual_inversion"]["vectors"] = 2
    run = Run(build_config(raw))
    final = run.fit()
    assert set(run.trainee.trained) == {"text_encoder", "text_encoder_2"}
    first, second = (load_file(final / name) for name in ("learned_embeds.safetensors",
                                                          "learned_embeds_2.safetensors"))
    assert first[TOKEN].shape == (2, 16) and second[TOKEN].shape == (2, 24)
    pipe = StableDiffusionXLPipeline.from_pretrained(base, add_watermarker=False)
    before = render(pipe, INITIAL)
    RESULTS["embedding"].attach(get_family("sdxl"), pipe, final)
    assert pipe.tokenizer_2.convert_tokens_to_ids(f"{TOKEN}_1") == len(pipe.tokenizer_2) - 1
    after = render(pipe, TRAINED)
    assert np.abs(after - before).max() > 1e-3
    assert np.abs(in_memory(run, TRAINED) - after).max() < 1e-5


def test_what_cannot_be_trained_is_refused_with_its_key(tiny_base: Path, circles: Path) -> None:
    raw = ti_config(Path("a-flux-base"), circles, Path("out"), family="flux")
    with pytest.raises(ConfigError, match=r"method.kind = 'textual_inversion': family 'flux'"):
        build_config(raw)
    raw = ti_config(tiny_base, circles, Path("out"))
    raw["method"]["textual_inversion"]["vectors"] = 0
    with pytest.raises(ConfigError, match=r"method.textual_inversion.vectors"):
        build_config(raw)
    raw["method"]["textual_inversion"] |= {"vectors": 1, "caption": "a photo of a circle"}
    with pytest.raises(ConfigError, match=r"caption 'a photo of a circle' must carry the token"):
        build_config(raw)
    raw["method"]["textual_inversion"] |= {"caption": None, "token": "<Blob>"}
    with pytest.raises(ConfigError, match=r"method.textual_inversion.token: must be lowercase"):
        build_config(raw)
    raw = ti_config(tiny_base, circles, Path("out"))
    raw["data"]["cache_text"] = True
    with pytest.raises(ConfigError, match=r"data.cache_text"):
        build_config(raw)
    raw = ti_config(tiny_base, circles, Path("out"))
    raw["data"] |= {"streaming": True, "max_samples": 4}
    with pytest.raises(ConfigError, match=r"data.streaming: method 'textual_inversion'"):
        build_config(raw)


def test_the_token_init_word_and_captions_are_checked_against_the_base(tiny_base: Path, circles: Path,
                                                                      tmp_path: Path) -> None:
    family = get_family("sd")

    def build(**settings: Any) -> Any:
        raw = ti_config(tiny_base, circles, Path("out"))
        raw["method"]["textual_inversion"] |= settings
        config = build_config(raw)
        return make_method(config.method).build(family, family.load(config.model))

    with pytest.raises(ConfigError, match=r"method.textual_inversion.token = 'red' is already a token of the "
                                          r"base's tokenizer \('red</w>'\)"):
        build(token="red")
    with pytest.raises(ConfigError, match=r"method.textual_inversion.init_token = 'red circle' is 2 tokens of the "
                                          r"base's tokenizer \('red</w>', 'circle</w>'\)"):
        build(init_token="red circle")
    parts = family.load(build_config(ti_config(tiny_base, circles, Path("out"))).model)
    parts.components["tokenizer"].add_tokens([f"{TOKEN}_1"])  # a run before left its token behind
    raw = ti_config(tiny_base, circles, Path("out"))
    raw["method"]["textual_inversion"]["vectors"] = 2
    with pytest.raises(ConfigError, match=r"already a token of the base's tokenizer \('<blob>_1'\)"):
        make_method(build_config(raw).method).build(family, parts)

    data = token_folder(tmp_path / "data", 3)
    (data / "001.txt").write_text("a green circle")
    raw = ti_config(tiny_base, data, Path("out"))
    del raw["method"]["textual_inversion"]["caption"]
    config = build_config(raw)
    samples = open_training_data(config.data, 0, False, config.method.fixed_caption)
    with pytest.raises(DataError, match=r"row 1, column 'text': the caption 'a green circle' does not contain "
                                        r"method.textual_inversion.token '<blob>'"):
        make_method(config.method).training_data(family, None, {}, samples, None)


def test_generate_takes_the_run_as_embedding_and_names_the_flag_otherwise(sd_run: Run, tiny_base: Path,
                                                                          tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """`difftune generate --embedding RUN` loads final/ through its Result (the run knows
    its base); the same run given as --lora is named with the flag that takes it."""
    from PIL import Image

    from difftune.cli import main

    same = ["--steps", "2", "--resolution", "64", "--guidance-scale", "7.5", "--seed", "0"]
    common = ["--prompt", TRAINED, *same]
    assert main(["generate", "--embedding", str(sd_run.run_dir), *common, "--out", str(tmp_path / "t.png")]) == 0
    assert main(["generate", "--base", str(tiny_base), "--prompt", INITIAL, *same, "--out", str(tmp_path / "b.png")]) == 0
    trained, base = (np.asarray(Image.open(tmp_path / name), dtype=np.int16) for name in ("t.png", "b.png"))
    assert np.abs(trained - base).max() > 0, "the embedding changed nothing"
    capsys.readouterr()
    assert main(["generate", "--lora", str(sd_run.run_dir), *common, "--out", str(tmp_path / "l.png")]) == 2
    assert "this run made a textual-inversion embedding; give it as --embedding" in capsys.readouterr().err
