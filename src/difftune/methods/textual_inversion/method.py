"""Textual inversion (Gal et al. 2022): a new word ("<cat-toy>") whose input embedding
is all that trains, in every text encoder of the family (SDXL: both), as diffusers'
textual_inversion.py and textual_inversion_sdxl.py train it. With vectors = n the word
is n tokens, token, token_1, ... token_{n-1}, spelled out in every caption as diffusers'
pipelines spell it in a prompt (TextualInversionLoaderMixin.maybe_convert_prompt).

The tokens are added to the parts' tokenizers, so training and validation read them. Each
text encoder's input embedding becomes a GrownEmbedding: its rows as they were (frozen)
and the new rows (the only trained parameter), started from init_token's embedding.
diffusers' scripts train the whole matrix and copy the other rows back after each step;
here no other row can move at all, whatever the optimizer (weight decay included), and
the optimizer keeps state for the new rows alone.

The result is diffusers' learned_embeds format, {token: (vectors, dim)}, one file per
text encoder (results.embedding_files: learned_embeds.safetensors, and
learned_embeds_2.safetensors for SDXL's second), which `pipe.load_textual_inversion`
reads; checkpoints hold the same rows.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from difftune.config import ConfigError
from difftune.data.samples import SamplePlan, TrainingSamples
from difftune.data.sources import DataError
from difftune.families.base import Family, Parts
from difftune.methods.base import FromSettings, Trained, freeze, mean_loss, no_extra_inputs
from difftune.methods.full.method import generate_text_to_image
from difftune.results import EMBEDDINGS_FILE, RESULTS, embedding_files

if TYPE_CHECKING:
    from difftune.methods.textual_inversion.spec import TextualInversionMethod, TextualInversionSettings

KEY = "method.textual_inversion"


class GrownEmbedding(nn.Module):
    """An input embedding with rows added: `original` (the base's rows, frozen) and
    `added` (the new tokens' rows, ids from original.num_embeddings on, trained). Looks
    up exactly what one matrix of both would, without building that matrix."""

    def __init__(self, original: nn.Embedding, added: torch.Tensor) -> None:
        super().__init__()
        self.original = original
        self.added = nn.Parameter(added)
        self.first = original.num_embeddings
        self.embedding_dim = original.embedding_dim

    @property
    def num_embeddings(self) -> int:
        return self.first + self.added.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """Both as one matrix (a new tensor, for reading: write to `added`)."""
        return torch.cat([self.original.weight, self.added.to(self.original.weight.dtype)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        old = self.original(ids.clamp(max=self.first - 1))
        new = F.embedding((ids - self.first).clamp(min=0), self.added)
        return torch.where((ids >= self.first).unsqueeze(-1), new.to(old.dtype), old)


def grown(module: nn.Module) -> GrownEmbedding:
    embedding = module.get_input_embeddings()
    if not isinstance(embedding, GrownEmbedding):
        raise TypeError(f"{type(module).__name__} has no textual-inversion rows (its input embedding is a "
                        f"{type(embedding).__name__})")
    return embedding


def vector_tokens(token: str, vectors: int) -> list[str]:
    """The tokens of a word of `vectors` vectors, as diffusers names them."""
    return [token] + [f"{token}_{i}" for i in range(1, vectors)]


class TokenCaptions(TrainingSamples):
    """The same samples with the token spelled out in every caption ("<t>" ->
    "<t> <t>_1 <t>_2"), through `plan`, which both the loader and a latent cache read."""

    token: str
    spelled: str

    @classmethod
    def of(cls, samples: TrainingSamples, token: str, spelled: str) -> TokenCaptions:
        made = cls.__new__(cls)
        made.__dict__.update(vars(samples))
        made.token, made.spelled = token, spelled
        return made

    def plan(self, epoch: int, index: int) -> SamplePlan:
        plan = super().plan(epoch, index)
        return replace(plan, caption=self.spell(plan.caption))

    def caption_options(self, index: int | None = None) -> set[str]:
        return {self.spell(caption) for caption in super().caption_options(index)}

    def spell(self, caption: str) -> str:
        return caption.replace(self.token, self.spelled)


def check_captions(samples: TrainingSamples, token: str) -> None:
    """Every caption of the dataset's caption column (each of a row's list) names the token."""
    column = samples.columns.caption
    if column is None:  # one caption for all (method.textual_inversion.caption)
        return
    values = list(samples.rows[column])
    for row in samples.row_numbers:
        value = values[row]
        for caption in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(caption, bytes):
                caption = caption.decode("utf-8", errors="replace")
            if not isinstance(caption, str) or token not in caption:
                raise DataError(
                    f"{samples.config.path}, row {row}, column {column!r}: the caption {caption!r} does not contain "
                    f"{KEY}.token {token!r}; every caption must name it where the new word goes (or set "
                    f'{KEY}.caption = "a photo of {{token}}" to caption every image alike)')


class TextualInversion(FromSettings):
    floor_settings = None
    card_tags = ["textual_inversion"]

    def __init__(self, config: TextualInversionMethod) -> None:
        super().__init__(config)
        self.settings: TextualInversionSettings = config.textual_inversion
        self.tokens = vector_tokens(self.settings.token, self.settings.vectors)

    # --- what trains ------------------------------------------------------------------------

    def build(self, family: Family, parts: Parts) -> Trained:
        """Check the token and init_token against every tokenizer, then add the tokens
        and grow each text encoder's input embedding by their rows."""
        freeze(parts)
        pairs = list(zip(family.tokenizer_names, family.text_encoder_names, strict=True))  # type: ignore[attr-defined]
        starts = {}
        for tokenizer_name, _ in pairs:  # nothing changes before every tokenizer passes
            tokenizer = parts.components[tokenizer_name]
            self._check_new(tokenizer, tokenizer_name)
            starts[tokenizer_name] = self._init_id(tokenizer, tokenizer_name)
        added: dict[int, list[int]] = {}  # by tokenizer (one object may serve two encoders)
        trained = {}
        for tokenizer_name, encoder_name in pairs:
            tokenizer = parts.components[tokenizer_name]
            if id(tokenizer) not in added:
                added[id(tokenizer)] = self._add_tokens(tokenizer, tokenizer_name)
            trained[encoder_name] = self._grow(parts.components[encoder_name], encoder_name, added[id(tokenizer)],
                                               starts[tokenizer_name])
        return trained

    def _check_new(self, tokenizer: Any, name: str) -> None:
        token = self.settings.token
        vocabulary = tokenizer.get_vocab()
        known = [t for t in self.tokens if t in vocabulary]
        pieces = tokenizer.tokenize(token)
        if not known and len(pieces) == 1 and pieces[0] in vocabulary:
            known = pieces  # "cat" is the word token "cat</w>": adding it would take the word over
        if known:
            raise ConfigError([f"{KEY}.token = {token!r} is already a token of the base's {name} ({known[0]!r}): "
                               f"choose a word it does not know, such as '<{token.strip('<>')}>'"],
                              "the config, for this base")

    def _init_id(self, tokenizer: Any, name: str) -> int:
        word = self.settings.init_token
        ids = tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            pieces = ", ".join(map(repr, tokenizer.convert_ids_to_tokens(ids)))
            raise ConfigError([f"{KEY}.init_token = {word!r} is {len(ids)} tokens of the base's {name} ({pieces}), "
                               "not one: give a word it reads as a single token"], "the config, for this base")
        return ids[0]

    def _add_tokens(self, tokenizer: Any, name: str) -> list[int]:
        """The new tokens' ids: the next ones after the tokenizer's, as load_textual_inversion
        gives them when it loads the result."""
        first = len(tokenizer)
        tokenizer.add_tokens(self.tokens)
        ids = tokenizer.convert_tokens_to_ids(self.tokens)
        if ids != list(range(first, first + len(self.tokens))):
            raise RuntimeError(f"the base's {name} gave the new tokens ids {ids}, not {first} on")
        read = tokenizer.tokenize(" ".join(self.tokens))
        if read != self.tokens:
            raise ConfigError([f"{KEY}.token = {self.settings.token!r}: the base's {name} does not read it back as "
                               f"one token (it reads {read!r}); choose a plain word in angle brackets"],
                              "the config, for this base")
        return ids

    def _grow(self, encoder: nn.Module, name: str, ids: list[int], start: int) -> nn.Module:
        embedding = encoder.get_input_embeddings()
        first = ids[0]
        if embedding.num_embeddings < first:
            raise ValueError(f"the base's {name} has {embedding.num_embeddings} token embeddings, fewer than its "
                             f"tokenizer's {first} tokens")
        weight = embedding.weight.detach()
        # Rows past the tokenizer's (a padded vocabulary) are dropped, as load_textual_inversion does.
        original = embedding if embedding.num_embeddings == first else nn.Embedding.from_pretrained(
            weight[:first].clone(), freeze=True, padding_idx=embedding.padding_idx)
        rows = weight[start].float().repeat(len(ids), 1)
        encoder.set_input_embeddings(GrownEmbedding(original, rows))
        return encoder.train()  # as diffusers' scripts (CLIP has no dropout by default)

    # --- data and the step -----------------------------------------------------------------

    def training_data(
        self, family: Family, parts: Parts, trained: Trained, samples: Dataset, accelerator: Any
    ) -> Dataset:
        """The checked rows, each caption checked for the token and, with several vectors,
        the token spelled out as its tokens."""
        assert isinstance(samples, TrainingSamples)  # data.streaming is refused (spec)
        check_captions(samples, self.settings.token)
        if len(self.tokens) == 1:
            return samples
        return TokenCaptions.of(samples, self.settings.token, " ".join(self.tokens))

    condition = staticmethod(no_extra_inputs)

    reduce = staticmethod(mean_loss)

    # --- what is kept ------------------------------------------------------------------------

    def learned(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """diffusers' learned_embeds state: {token: (vectors, dim)}, fp32 on the CPU."""
        rows = grown(module).added.detach()
        return {self.settings.token: rows.to("cpu", torch.float32).contiguous()}

    def store(self, name: str, module: nn.Module, folder: Path) -> None:
        (folder / name).mkdir(parents=True, exist_ok=True)
        save_file(self.learned(module), folder / name / EMBEDDINGS_FILE)

    def restore(self, name: str, module: nn.Module, folder: Path) -> None:
        file = folder / name / EMBEDDINGS_FILE
        state = load_file(file)
        rows = grown(module).added
        saved = state.get(self.settings.token)
        if len(state) != 1 or saved is None or saved.shape != rows.shape:
            found = {key: tuple(value.shape) for key, value in state.items()}
            raise ValueError(f"{file} holds {found}, not {self.settings.token!r} of shape {tuple(rows.shape)}")
        with torch.no_grad():
            rows.copy_(saved)

    def save(self, family: Family, parts: Parts, trained: Trained, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for encoder, _, weights in embedding_files(family):
            save_file(self.learned(trained[encoder]), out_dir / weights)

    def usage(self, family: Family, repo: str, base: str) -> str:
        prompt = self.config.fixed_caption or f"a photo of {self.settings.token}"
        loading = RESULTS["embedding"].usage(family, repo, base).rstrip("\n")
        return f'{loading}\nimage = pipe("{prompt}").images[0]'

    generate = staticmethod(generate_text_to_image)
