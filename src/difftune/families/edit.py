"""What the edit families share (capability "edit", families/base.py EditCapability): a
batch whose samples carry different reference counts or sizes runs as groups that share
them, since the reference tokens join each sample's sequence and a sequence batch must
be of one length.

`ModelInputs.extra["references"]` holds, per sample, the list of its references'
latents, each (channels, height, width), possibly empty (a row without a reference
trains as text-to-image). A family's predict hands its own denoiser call to
`predict_by_references`, which calls it once per group with
`extra["reference_latents"]`: one (group, channels, height, width) tensor per reference.
A batch of one kind (the usual case) is one call on the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from difftune.families.base import ModelInputs


def reference_groups(references: list[list[torch.Tensor]]) -> dict[tuple, list[int]]:
    """Sample indices by their references' shapes, in the order first met."""
    groups: dict[tuple, list[int]] = {}
    for index, latents in enumerate(references):
        groups.setdefault(tuple(tuple(latent.shape) for latent in latents), []).append(index)
    return groups


def predict_by_references(
    inputs: ModelInputs, predict_one: Callable[[ModelInputs], torch.Tensor]
) -> torch.Tensor:
    """The target's prediction for a batch with references, one denoiser call per group of
    samples whose references agree in count and sizes (`predict_one` sees
    extra["reference_latents"] and no "references")."""
    import torch

    references = inputs.extra["references"]
    rest = {key: value for key, value in inputs.extra.items() if key != "references"}
    groups = reference_groups(references)
    if len(groups) == 1:
        stacked = [torch.stack(column) for column in zip(*references)] if references[0] else []
        return predict_one(replace(inputs, extra={**rest, "reference_latents": stacked}))
    prediction: torch.Tensor | None = None
    for indices in groups.values():
        chosen = torch.tensor(indices, device=inputs.noisy.device)
        members = [references[i] for i in indices]
        stacked = [torch.stack(column) for column in zip(*members)] if members[0] else []
        part = predict_one(replace(
            inputs, noisy=inputs.noisy[chosen], timesteps=inputs.timesteps[chosen],
            text={name: tensor[chosen] for name, tensor in inputs.text.items()},
            geometry=None if inputs.geometry is None else inputs.geometry[chosen],
            extra={**rest, "reference_latents": stacked}))
        if prediction is None:
            prediction = part.new_zeros((inputs.noisy.shape[0], *part.shape[1:]))
        prediction = prediction.index_copy(0, chosen, part)
    assert prediction is not None
    return prediction


def reference_pixels(sample_references: list[Any]) -> list[Any]:
    """A sample's references as PIL images (an edit pipeline's processor takes PIL), from
    pixel tensors in [0, 1]."""
    import numpy as np
    from PIL import Image

    return [Image.fromarray((tensor.clamp(0, 1).permute(1, 2, 0).float().cpu().numpy() * 255).round()
                            .astype(np.uint8)) for tensor in sample_references]
