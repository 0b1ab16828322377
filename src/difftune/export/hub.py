"""Publishing a run: a model card beside the final weights, and the Hub upload."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCardData

from difftune.config import RunConfig
from difftune.families import get_family
from difftune.methods import make_method
from difftune.rundir import RunDir

TAGS = ["diffusers", "difftune"]


def latest_validation(run_dir: Path) -> Path | None:
    steps = sorted((run_dir / "validation").glob("step-*"))
    return steps[-1] if steps else None


def write_model_card(run_dir: Path, config: RunConfig, folder: Path) -> Path:
    """README.md with base model, dataset, settings and the latest validation grids."""
    images = _copy_grids(run_dir, folder)
    family, method = get_family(config.model.family), make_method(config.method)
    metadata = ModelCardData(
        license=family.license,
        base_model=config.model.pretrained,
        datasets=[config.data.path],
        tags=family.card_tags + TAGS + method.card_tags,
        library_name="diffusers",
        inference=True,
    )
    pairs = config.validation.pairs()
    gallery = "\n".join(f"prompt: {prompt}\n![grid {i}](./{name})\n" for i, (name, (prompt, _)) in
                        enumerate(zip(images, pairs)))
    body = f"""# {config.method.kind} - {_repo_name(config)}

A {config.method.kind} trained with [difftune](https://pypi.org/project/difftune/) on
`{config.model.pretrained}`, with data `{config.data.path}`
({config.data.resolution} px, batch {config.train.batch_size} x {config.train.gradient_accumulation_steps} accumulation,
learning rate {config.train.learning_rate}, {config.train.mixed_precision} precision).

Each grid shows the validation images for one prompt (after the conditioning image, if any).

{gallery}
## Use

```python
{method.usage(family, _repo_name(config), config.model.pretrained)}
```
"""
    path = folder / "README.md"
    path.write_text(f"---\n{metadata.to_yaml()}\n---\n\n{body}")
    return path


def _copy_grids(run_dir: Path, folder: Path) -> list[str]:
    source = latest_validation(run_dir)
    if source is None:
        return []
    names = []
    for index, grid in enumerate(sorted(source.glob("pair-*-grid.png"))):
        name = f"images_{index}.png"
        shutil.copyfile(grid, folder / name)
        names.append(name)
    return names


def _repo_name(config: RunConfig) -> str:
    return config.hub.model_id or Path(config.train.output_dir).resolve().name


def push_to_hub(run_dir: Path, config: RunConfig, api: Any | None = None) -> str:
    """Upload final/ (weights, card, grids) to the Hub; return the repo id."""
    folder = RunDir(run_dir).final
    write_model_card(run_dir, config, folder)
    api = api or HfApi()
    repo_id = api.create_repo(_repo_name(config), private=config.hub.private, exist_ok=True).repo_id
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message="difftune: final weights",
        ignore_patterns=["step_*", "epoch_*", "checkpoint-*"],
    )
    return repo_id
