"""The committed demo base and data are what the scripts say they are."""

from pathlib import Path

import datasets
from transformers import AutoTokenizer

from difftune.config import load_config
from difftune.data.synthetic import DEMO_PALETTE, fill_circles_rows

ROOT = Path(__file__).resolve().parents[1]


def test_demo_preset_points_at_committed_files() -> None:
    config = load_config(ROOT / "configs" / "demo" / "fill_circles_controlnet.toml")
    for path in (config.model.pretrained, config.data.path, config.validation.metric_data, *config.validation.images):
        assert (ROOT / path).exists(), path
    assert config.validation.metric_samples >= 32


def test_base_tokenizer_has_one_token_per_word() -> None:
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "assets" / "fill-circles-base", subfolder="tokenizer")
    for word in DEMO_PALETTE + ["circle", "with", "background"]:
        assert len(tokenizer.tokenize(word)) == 1, word


def test_committed_data_matches_the_generator() -> None:
    for folder, count, seed in (("train", 5000, 2), ("held-out", 64, 1)):
        rows = datasets.load_dataset(str(ROOT / "assets" / "fill-circles" / folder), split="train")
        assert len(rows) == count
        expected = fill_circles_rows(3, 32, seed, DEMO_PALETTE)
        assert rows["text"][:3] == expected["text"]
        assert list(rows[0]["image"].convert("RGB").getdata()) == list(expected["image"][0].getdata())


def test_every_fill_circles_preset_trains_on_a_committed_base_of_its_family() -> None:
    from difftune.families import family_of_pipeline

    presets = sorted((ROOT / "configs" / "demo").glob("fill_circles_*.toml"))
    assert len(presets) >= 6
    for preset in presets:
        config = load_config(preset)
        base = ROOT / config.model.pretrained
        assert family_of_pipeline(base).name == config.model.family, preset.name
        size = sum(f.stat().st_size for f in base.rglob("*") if f.is_file())
        assert size <= 20 * 2**20, (base, size)  # each tiny base stays within 20 MB
        for path in (config.data.path, config.validation.metric_data, *config.validation.images):
            assert (ROOT / path).exists(), (preset.name, path)
