"""Model families, by config name."""

from difftune.families.base import Family, ModelInputs, Parts
from difftune.families.sd import StableDiffusion

FAMILIES: dict[str, Family] = {"sd": StableDiffusion()}

__all__ = ["FAMILIES", "Family", "ModelInputs", "Parts"]
