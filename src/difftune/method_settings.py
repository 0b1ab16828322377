"""What every method's [method] table shares: the base class of each method's settings
(methods/<kind>/spec.py), its traits with their defaults, and the tables more than one
method reads (EMA, the text-encoder switch). Torch-free: the config
validates these before any model loads."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from difftune.strict import Section

if TYPE_CHECKING:
    from difftune.catalog import FamilyFacts
    from difftune.sampling import BaseSampling


class EmaSettings(Section):
    """An exponential moving average of the trained weights; it is what gets exported."""

    decay: float = Field(0.9999, gt=0.0, lt=1.0)
    """Upper bound of the decay."""
    min_decay: float = Field(0.0, ge=0.0, lt=1.0)
    """Lower bound of the decay: each update's decay from the schedule is clamped between
    min_decay and decay (diffusers' EMAModel; its first update copies the weights even
    so). 0.0: no floor, the schedule alone sets the early decay."""
    warmup: bool = False
    """Decay 1 - (1 + n / inv_gamma) ** -power (Karras-style warmup) instead of (1 + n) / (10 + n)."""
    inv_gamma: float = Field(1.0, gt=0)
    """With warmup: the n in 1 - (1 + n / inv_gamma) ** -power is divided by it, so a
    larger value stretches the warmup over more updates. Ignored without warmup."""
    power: float = Field(2 / 3, gt=0)
    """With warmup: how fast the decay rises toward decay. With inv_gamma 1, 2/3 reaches
    0.999 after about 31.6K updates and 0.9999 after 1M; 3/4, for shorter runs, 0.999
    after 10K. Ignored without warmup."""
    start_step: int = Field(0, ge=0)
    """Optimizer steps before the average starts following the weights."""
    update_every: int = Field(1, gt=0)
    """Update the average every N optimizer steps (n above counts updates)."""



class MethodSettings(Section):
    """The [method] table of one kind. Each kind's subclass adds only its own keys and
    sets the traits below that differ; the config's checks across sections read the
    traits, never the kind's name."""

    kind: str
    ema: EmaSettings | None = None
    """Keep and export an EMA of the trained weights."""

    needs_conditioning: ClassVar[bool] = False
    """Whether training samples carry a conditioning image (known before the method's
    code is imported, so the data is checked before torch loads)."""
    takes_references: ClassVar[bool] = False
    """Whether the conditioning images are references (edit): read from
    data.reference_image_column, optional per row, several per row allowed, and encoded
    at the size the family's edit pipeline gives them."""
    own_loss: ClassVar[str | None] = None
    """The loss the method computes itself, if it does (the config then refuses the
    [objective] options, which it would not read), named for that error."""
    streaming_refused: ClassVar[str | None] = None
    """Why it cannot train from a streamed dataset (data.streaming), if it cannot."""
    RESULT: ClassVar[str] = "pipeline"
    PATH_KEYS: ClassVar[tuple[str, ...]] = ()
    """Its keys that name local paths ("dreambooth.class_data"), made absolute in the
    run's recorded config."""

    @property
    def result(self) -> str:
        """What final/ holds (a kind of results.Result): "pipeline", "lora", "controlnet", ..."""
        return self.RESULT

    @property
    def uses_lora(self) -> bool:
        """Whether peft LoRA adapters are what trains (a [method.lora] table)."""
        return False

    @property
    def trains_text_encoder(self) -> bool:
        return False

    @property
    def trains_every_weight(self) -> bool:
        """Whether every denoiser weight trains (so the base cannot be held quantized)."""
        return False

    @property
    def fixed_caption(self) -> str | None:
        """One prompt for every training image (DreamBooth's instance prompt), if any."""
        return None

    @property
    def sampling(self) -> BaseSampling | None:
        """How its result samples where the method decides it (a step-distilled result: LCM-LoRA
        samples with LCMScheduler in 4 steps at guidance 1), or None: as the base does. The
        validation settings the config leaves unset take it (config/run.py), and so does
        `difftune generate` from the run's config."""
        return None

    def family_problem(self, family: FamilyFacts) -> str | None:
        """Why this family cannot train these settings (beyond the kind itself), or None."""
        if self.trains_text_encoder and not family.text_encoder_trainable:
            return (f"method.train_text_encoder: family {family.name!r} trains its transformer alone "
                    "(diffusers loads no text-encoder weights for it)")
        return None

    def batch_notes(self, batch_size: int) -> list[str]:
        """What the run should know about its settings at this per-process batch size (said
        before the first step; the run trains as configured)."""
        return []

    def model_folders(self) -> dict[str, str]:
        """Models the method reads besides the base (method.controlnet), by key, for the
        plan's checks that each exists and fits the base."""
        return {}

    def image_folders(self) -> dict[str, str]:
        """Folders of images it trains on and fills with generated ones (DreamBooth's class
        images), by key: the plan checks each is writable, apart from the data, and whole."""
        return {}


class TextEncoderOption(MethodSettings):
    """For methods that change weights: the text encoders may train too."""

    train_text_encoder: bool = False
    """Train the text encoder too (fully for full/dreambooth, with adapters for LoRA)."""

    @property
    def trains_text_encoder(self) -> bool:
        return self.train_text_encoder
