"""What the tiny pipelines share, built locally with no download: word-level CLIP and T5
tokenizers, and CLIP, UNet and VAE parts at given sizes. Each family's own builder is in
its folder (families/<name>/tiny.py: build_tiny_sd, build_tiny_sdxl, ...).

The tests and the demo need a base model; a real one is gigabytes behind a network we
may not have. These are the same diffusers/transformers classes at toy sizes, saved
with save_pretrained so the real from_pretrained path reads them back.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, PreTrainedTokenizerBase

SPECIALS = ("<|startoftext|>", "<|endoftext|>")
LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair merge of one lowercase word (lowest-ranked pair first)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(parts, parts[1:]))]
        rank, index = min(pairs)
        if rank == 1 << 30:
            break
        parts[index : index + 2] = [parts[index] + parts[index + 1]]
    return parts


def word_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges that turn every word into one token, repaired until no word splits."""
    merges: list[tuple[str, str]] = []
    for _ in range(64):
        ranks = {pair: i for i, pair in enumerate(merges)}
        split = [(w, _bpe(w, ranks)) for w in words if len(_bpe(w, ranks)) > 1]
        if not split:
            return merges
        for _, parts in split:
            current = parts[0]
            for part in parts[1:]:
                if (current, part) not in ranks:
                    ranks[(current, part)] = len(merges)
                    merges.append((current, part))
                current += part
    raise RuntimeError("could not build word merges")


def write_word_tokenizer(out_dir: Path, words: list[str], max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary holds every letter and every given word."""
    words = sorted({w.lower() for w in words if w})
    merges = word_merges(words)
    vocab: dict[str, int] = {}
    for token in [*SPECIALS, *LETTERS, *(c + "</w>" for c in LETTERS)]:
        vocab.setdefault(token, len(vocab))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab))
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n")
    return CLIPTokenizer(
        str(out_dir / "vocab.json"),
        str(out_dir / "merges.txt"),
        model_max_length=max_length,
        bos_token=SPECIALS[0],
        eos_token=SPECIALS[1],
        pad_token=SPECIALS[1],
        unk_token=SPECIALS[1],
    )


def tiny_unet(dims: dict, **extra: object) -> UNet2DConditionModel:
    """The UNet at dims' sizes; `extra` adds config (SDXL's added embedding)."""
    down = dims.get("down", ("DownBlock2D", "CrossAttnDownBlock2D"))
    return UNet2DConditionModel(
        block_out_channels=dims["unet"],
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=down,
        up_block_types=tuple(name.replace("Down", "Up") for name in reversed(down)),
        cross_attention_dim=dims["text"],
        attention_head_dim=dims["heads"],
        norm_num_groups=dims["unet_groups"],
        **extra,
    )


def tiny_vae(dims: dict) -> AutoencoderKL:
    """One block per entry of dims["vae"]: latents at 1/2 the image size for two blocks,
    1/8 for four (the ControlNet stride must match)."""
    blocks = len(dims["vae"])
    return AutoencoderKL(
        block_out_channels=list(dims["vae"]),
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        latent_channels=4,
        norm_num_groups=dims["vae_groups"],
    )


def tiny_text_encoder(dims: dict, vocab_size: int, layers: int, max_length: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=dims["text"],
        intermediate_size=dims["text"] * 2,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=layers,
        vocab_size=vocab_size,
        max_position_embeddings=max_length,
    )
    return CLIPTextModel(config)


def write_t5_tokenizer(out_dir: Path, words: list[str], max_length: int = 512) -> PreTrainedTokenizerBase:
    """A T5 (unigram, metaspace) tokenizer whose pieces are the given words, then letters."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = sorted({w.lower() for w in words if w})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((f"\u2581{w}", -1.0) for w in words),
              ("\u2581", -5.0), *((c, -10.0) for c in LETTERS)]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                extra_ids=0, model_max_length=max_length)
    tokenizer.save_pretrained(out_dir)
    return tokenizer
