"""The latent and text cache: same training as without it, reused when nothing changed,
re-encoding exactly what changed."""

import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_config
from safetensors.torch import load_file

from difftune.config import ConfigError, build_config
from difftune.training.events import read_events
from difftune.training.loop import Run


def _cache_stats(run: Path) -> dict:
    return [e for e in read_events(run) if e["event"] == "cache"][-1]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("flip", [False, True])
def test_cached_training_matches_uncached(tiny_base: Path, circles: Path, tmp_path: Path, flip: bool) -> None:
    data = {"random_flip": flip, "proportion_empty_prompts": 0.3}
    plain = run_config(tiny_base, circles, tmp_path / "plain", data=data)
    cached = run_config(tiny_base, circles, tmp_path / "cached", data={
        **data, "cache_latents": True, "cache_text": True, "encoded_cache_dir": str(tmp_path / "cache")})
    Run(build_config(plain)).fit()
    Run(build_config(cached)).fit()
    stats = _cache_stats(tmp_path / "cached")
    assert stats["latents_encoded"] == 12 and stats["latents_reused"] == 0
    assert stats["texts_encoded"] == len({*_captions(circles), ""})
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "cached")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5  # only batching order differs
    losses = [[e["loss"] for e in read_events(tmp_path / r) if e["event"] == "step"] for r in ("plain", "cached")]
    assert max(abs(x - y) for x, y in zip(*losses)) < 1e-5


def _captions(folder: Path) -> list[str]:
    import json

    return [json.loads(line)["text"] for line in (folder / "metadata.jsonl").read_text().splitlines()]


def test_cache_is_reused_and_reencodes_only_what_changed(tiny_base: Path, circles: Path, tmp_path: Path) -> None:
    data_dir = shutil.copytree(circles, tmp_path / "data")
    cache = {"cache_latents": True, "cache_text": True, "encoded_cache_dir": str(tmp_path / "cache")}
    raw = run_config(tiny_base, data_dir, tmp_path / "a", data=cache, train={"max_steps": 1})
    Run(build_config(raw)).fit()
    raw["train"]["output_dir"] = str(tmp_path / "b")
    Run(build_config(raw)).fit()
    stats = _cache_stats(tmp_path / "b")
    assert (stats["latents_encoded"], stats["latents_reused"], stats["texts_encoded"]) == (0, 12, 0)
    # one image edited: one latent entry is encoded again, nothing else
    (data_dir / "images" / "000004.png").write_bytes((data_dir / "images" / "000005.png").read_bytes())
    raw["train"]["output_dir"] = str(tmp_path / "c")
    Run(build_config(raw)).fit()
    stats = _cache_stats(tmp_path / "c")
    assert stats["latents_encoded"] == 1 and stats["latents_reused"] == 11 and stats["texts_encoded"] == 0
    # another resolution is another cache
    raw["train"]["output_dir"] = str(tmp_path / "d")
    raw["data"]["resolution"] = 32
    Run(build_config(raw)).fit()
    assert _cache_stats(tmp_path / "d")["latents_encoded"] == 12


def test_the_cache_verb_lists_and_clears_what_runs_cached(tiny_base: Path, circles: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    from difftune.cli import main

    cache = {"cache_latents": True, "cache_text": True, "encoded_cache_dir": str(tmp_path / "cache")}
    Run(build_config(run_config(tiny_base, circles, tmp_path / "a", data=cache, train={"max_steps": 1}))).fit()
    (tmp_path / "cache" / "latents" / "not-ours").mkdir()  # no index.json: never touched
    capsys.readouterr()
    assert main(["cache", "list", "--dir", str(tmp_path / "cache")]) == 0
    listed = capsys.readouterr().err
    assert "2 context(s)" in listed and "latents" in listed and "12 entries" in listed
    assert main(["cache", "clear", "--dir", str(tmp_path / "cache"), "--older-than", "1"]) == 0
    assert "removed 0 context(s)" in capsys.readouterr().err  # both were used a moment ago
    assert main(["cache", "clear", "--dir", str(tmp_path / "cache")]) == 0
    assert "removed 2 context(s)" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "cache" / "latents").iterdir()] == ["not-ours"]


def test_cache_settings_that_cannot_work_are_config_errors(tiny_base: Path, circles: Path, tmp_path: Path) -> None:
    raw = run_config(tiny_base, circles, tmp_path / "run", data={"cache_latents": True, "center_crop": False})
    with pytest.raises(ConfigError, match="cache_latents needs center_crop"):
        build_config(raw)
    raw = run_config(tiny_base, circles, tmp_path / "run", data={"cache_text": True},
                     method={"kind": "full", "train_text_encoder": True})
    with pytest.raises(ConfigError, match=r"data.cache_text: method 'full' trains the text encoders \(method.train_text_encoder"):
        build_config(raw)


def test_a_failed_share_of_the_encoding_stops_every_process() -> None:
    from difftune.data.cache import Processes

    waited = []

    def fail() -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):  # this process failed: its own error
        Processes(wait=lambda: waited.append(1)).run_share(fail)
    # this process did its share, another failed: it raises too, not waiting at the barrier
    with pytest.raises(RuntimeError, match="another process failed"):
        Processes(index=0, count=2, wait=lambda: waited.append(1), any_of=lambda flag: True).run_share(lambda: None)
    assert waited == []
    Processes(wait=lambda: waited.append(1)).run_share(lambda: None)
    assert waited == [1]


@pytest.mark.parametrize("damage", ["truncated shard", "zeroed shard", "deleted shard", "corrupt index"])
def test_a_damaged_cache_is_encoded_again_to_the_same_training(damage, tiny_base: Path, circles: Path,
                                                              tmp_path: Path) -> None:
    """Fault suite, class 3: a damaged cache costs an encode, never a traceback or a wrong sample."""
    cache = {"cache_latents": True, "cache_text": True, "encoded_cache_dir": str(tmp_path / "cache")}
    raw = run_config(tiny_base, circles, tmp_path / "a", data=cache, train={"max_steps": 2})
    Run(build_config(raw)).fit()
    latents = next((tmp_path / "cache" / "latents").iterdir())
    shard = next(latents.glob("shard-*.safetensors"))
    if damage == "truncated shard":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    elif damage == "zeroed shard":
        shard.write_bytes(bytes(shard.stat().st_size))
    elif damage == "deleted shard":
        shard.unlink()
    else:
        (latents / "index.json").write_text('{"half an ind')
    raw["train"]["output_dir"] = str(tmp_path / "b")
    Run(build_config(raw)).fit()
    stats = _cache_stats(tmp_path / "b")
    assert stats["latents_encoded"] == 12 and stats["texts_encoded"] == 0
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_text_cache_key_follows_every_tokenizer_setting(tiny_base: Path) -> None:
    """A tokenizer that pads with another token, or cuts at another length, makes other
    embeddings: its cache entries must not be reused (found from outside: a changed
    pad_token reused the old entries)."""
    from transformers import AutoTokenizer

    from difftune.families import Parts, get_family

    family = get_family("sd")
    tokenizer = AutoTokenizer.from_pretrained(tiny_base, subfolder="tokenizer")
    parts = Parts(str(tiny_base), {"tokenizer": tokenizer})
    seen = {str(family.text_cache_identity(parts))}
    family.token_ids(tokenizer, ["a red circle"])  # using it leaves the key as it was
    assert str(family.text_cache_identity(parts)) in seen
    tokenizer.pad_token = "a"
    seen.add(str(family.text_cache_identity(parts)))
    tokenizer.model_max_length = 20
    seen.add(str(family.text_cache_identity(parts)))
    assert len(seen) == 3


def test_unset_caches_are_chosen_where_they_pay_and_cannot_be_stale(tiny_base: Path, circles: Path,
                                                                   tmp_path: Path) -> None:
    from difftune.families import get_family
    from difftune.training.cache_choice import choose_caches

    def choice(steps: int, data: dict | None = None, method: dict | None = None) -> tuple[bool, bool, str]:
        raw = run_config(tiny_base, circles, tmp_path / "run", data={"encoded_cache_dir": str(tmp_path / "c"),
                                                                     **(data or {})},
                         train={"max_steps": steps}, **({"method": method} if method else {}))
        raw["validation"] = {"every": 1000}
        config = build_config(raw)
        chosen = choose_caches(config, 12, get_family("sd"))
        assert (config.data.cache_latents, config.data.cache_text) == (chosen.latents, chosen.text)
        return chosen.latents, chosen.text, " | ".join(chosen.notes)

    assert choice(4)[:2] == (False, False)  # 8 samples drawn of 12: encoding them all first costs more
    assert choice(12)[:2] == (True, True)  # each sample twice
    latents, text, notes = choice(12, {"random_flip": True})
    assert (latents, text) == (False, True) and "random_flip caches both sides" in notes
    latents, text, notes = choice(100, {"center_crop": False})
    assert (latents, text) == (False, True) and "a random crop differs every epoch" in notes
    latents, text, notes = choice(100, method={"kind": "lora", "train_text_encoder": True})
    assert (latents, text) == (True, False) and "trains the text encoders" in notes
    latents, text, notes = choice(100, {"cache_latents": False})  # as written: only the unset one is chosen
    assert (latents, text) == (False, True) and "cache_latents" not in notes


def test_a_resumed_run_keeps_the_caches_its_start_chose(tiny_base: Path, circles: Path, tmp_path: Path) -> None:
    import tomllib

    raw = run_config(tiny_base, circles, tmp_path / "run", train={"max_steps": 4, "checkpoint_every": 2})
    raw["validation"] = {"every": 1000}
    Run(build_config(raw)).fit()  # 8 samples drawn of 12: no cache
    raw["train"]["max_steps"] = 30  # would choose both caches for a new run
    Run(build_config(raw)).fit()
    recorded = tomllib.loads((tmp_path / "run" / "config.toml").read_text())["data"]
    assert (recorded["cache_latents"], recorded["cache_text"]) == (False, False)
    assert not [e for e in read_events(tmp_path / "run") if e["event"] == "cache"]


def test_a_vae_whose_decoder_alone_changed_reads_the_same_latents(tiny_base: Path, circles: Path,
                                                                   tmp_path: Path) -> None:
    """The latent cache holds the encoder's posterior: a base whose VAE decoder was tuned (as
    sd-vae-ft-mse tunes SD's) reads every entry back; one whose encoder changed encodes again."""
    from diffusers import AutoencoderKL

    base = Path(shutil.copytree(tiny_base, tmp_path / "base"))
    cache = {"cache_latents": True, "cache_text": True, "encoded_cache_dir": str(tmp_path / "cache")}
    counts = []
    for run, part in (("a", None), ("b", "decoder"), ("c", "encoder")):
        if part is not None:
            vae = AutoencoderKL.from_pretrained(base / "vae")
            with torch.no_grad():
                next(getattr(vae, part).parameters()).add_(0.01)
            vae.save_pretrained(base / "vae")
        Run(build_config(run_config(base, circles, tmp_path / run, data=cache, train={"max_steps": 1}))).fit()
        stats = _cache_stats(tmp_path / run)
        counts.append((stats["latents_encoded"], stats["latents_reused"]))
    assert counts == [(12, 0), (0, 12), (12, 0)]
