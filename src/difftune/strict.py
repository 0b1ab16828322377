"""The strict base of every settings table (the run config's sections and each method's
settings): unknown keys and wrong types are errors. At the bottom of the tree, so that a
method's settings (methods/<kind>/spec.py) and the config share it without importing
each other."""

from __future__ import annotations

import os
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


class Section(BaseModel):
    # allow_inf_nan=False: inf or nan in any number (learning_rate = inf) is an error
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, allow_inf_nan=False)


def expand_home(value: str) -> str:
    """~ and ~user mean the home folder in every path a config names (a Hub id never
    starts with ~)."""
    return os.path.expanduser(value) if value.startswith("~") else value


PathText = Annotated[str, AfterValidator(expand_home)]
"""A local path or a Hub id."""

NonEmpty = Field(min_length=1, pattern=r"\S")
"""A string with something in it besides spaces."""
