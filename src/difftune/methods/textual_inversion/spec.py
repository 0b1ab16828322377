"""Textual inversion as the catalog lists it: [method.textual_inversion] (the new word,
the word its vectors start from, how many vectors, the caption that carries it)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from difftune.catalog import MethodSpec
from difftune.method_settings import MethodSettings
from difftune.strict import NonEmpty, Section

PLACEHOLDER = "{token}"
"""Where the token goes in method.textual_inversion.caption."""


class TextualInversionSettings(Section):
    """Textual inversion (Gal et al. 2022): a new word whose input embedding is all that
    trains, in every text encoder (SDXL: both), as diffusers' textual_inversion.py and
    textual_inversion_sdxl.py train it."""

    token: str = NonEmpty
    """The new word ("<cat-toy>"); no token of the base's tokenizers yet (checked when
    the model loads). With vectors > 1 it stands for token, token_1, ... token_{n-1}."""
    init_token: str = NonEmpty
    """A word the tokenizers read as one token ("toy"): its embedding starts every vector."""
    vectors: int = Field(1, ge=1)
    """Embedding vectors the token learns (diffusers' --num_vectors)."""
    caption: str | None = None
    """One caption for every image, with {token} where the token goes ("a photo of
    {token}"); without it the dataset's captions are used, and each must contain the token."""

    @field_validator("token")
    @classmethod
    def _one_lowercase_word(cls, token: str) -> str:
        if any(c.isspace() for c in token):
            raise ValueError(f"must be one word, without spaces (got {token!r})")
        if token != token.lower():
            raise ValueError(f"must be lowercase: CLIP's tokenizers lowercase every prompt (got {token!r}; "
                             f"{token.lower()!r} would do)")
        if PLACEHOLDER in token:
            raise ValueError(f"is the word itself; {PLACEHOLDER} belongs in method.textual_inversion.caption")
        return token

    @model_validator(mode="after")
    def _caption_names_the_token(self) -> TextualInversionSettings:
        if self.caption is not None and self.token not in self.caption.replace(PLACEHOLDER, self.token):
            raise ValueError(f"caption {self.caption!r} must carry the token: write "
                             f"{PLACEHOLDER} (or {self.token!r}) where it goes, as in \"a photo of {PLACEHOLDER}\"")
        if self.init_token == self.token:
            raise ValueError(f"init_token is the new token {self.token!r}: give an "
                             "existing word the new vectors start from")
        return self


class TextualInversionMethod(MethodSettings):
    """kind = "textual_inversion": a new word's embedding vectors, all else frozen; the
    learned_embeds files diffusers' load_textual_inversion reads."""

    kind: Literal["textual_inversion"] = "textual_inversion"
    textual_inversion: TextualInversionSettings
    """The token, init_token, vectors and caption."""

    RESULT: ClassVar[str] = "embedding"
    streaming_refused: ClassVar[str | None] = ("checks that every caption carries its token and learns from a few "
                                               "images, which are read whole")

    @property
    def trains_text_encoder(self) -> bool:
        """The input embeddings of the text encoders train (so their outputs cannot be cached)."""
        return True

    @property
    def fixed_caption(self) -> str | None:
        caption = self.textual_inversion.caption
        return None if caption is None else caption.replace(PLACEHOLDER, self.textual_inversion.token)


SPEC = MethodSpec(kind="textual_inversion", description="textual inversion: a new word's embedding (learned_embeds)",
                  settings=TextualInversionMethod, needs=frozenset({"token_embeddings"}),
                  factory="difftune.methods.textual_inversion.method:TextualInversion")
