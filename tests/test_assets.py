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
