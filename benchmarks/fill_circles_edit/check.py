"""Score a trained fill-circles edit model with diffusers' own edit pipeline, apart from training.

Loads RUN/final into the base family's edit pipeline (FluxKontextPipeline,
QwenImageEditPipeline): a whole edit pipeline as it is, an edit LoRA onto the base's
pipeline. For every held-out row it edits the reference with the instruction ("make the
circle C") and scores the result (difftune.metrics.FillCirclesEdit): shape IoU against the
reference's disc, and whether the disc is now colour C. The floor is the base's own edit
pipeline on the same rows, with the same seeds. Prints both as JSON.

    python benchmarks/fill_circles_edit/check.py RUN_DIR --base BASE [--held-out DIR] [--steps 20] [--no-floor]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from difftune.data.sources import reference_cells
from difftune.families import family_of_pipeline
from difftune.metrics import FillCirclesEdit, mean_scores

ROOT = Path(__file__).resolve().parents[2]


def held_out_rows(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    return [row for row in rows if reference_cells(row["reference_image"])]


def edit_pipeline(base: str, final: Path | None) -> object:
    family = family_of_pipeline(Path(base))
    assert family is not None, f"{base}: not a pipeline of a difftune family"
    # the family's loader: the class its "edit" pipeline is (Qwen-Image-Edit's processor loads without torchvision)
    if final is not None and (final / "model_index.json").is_file():
        pipe = family.load_pipeline(str(final), torch.float32, kind="edit")
    else:
        pipe = family.load_pipeline(base, torch.float32, kind="edit")
        if final is not None:
            pipe.load_lora_weights(str(final))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def score(pipe: object, family: object, rows: list[dict], folder: Path, size: int, steps: int, seed: int) -> dict:
    metric, scores = FillCirclesEdit(), []
    for index, row in enumerate(rows):
        reference = Image.open(folder / reference_cells(row["reference_image"])[0]).convert("RGB")
        call = family.edit_arguments(reference, size, size) | family.generation_options(pipe)
        image = pipe(prompt=row["text"], num_inference_steps=steps, generator=torch.Generator().manual_seed(seed + index),
                     **call).images[0]
        scores.append(metric.score(image, reference, row["text"]))
    return mean_scores(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--base", required=True)
    parser.add_argument("--held-out", type=Path, default=ROOT / "assets" / "fill-circles-edit" / "held-out")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-floor", action="store_true", help="score the trained result only")
    args = parser.parse_args()
    family = family_of_pipeline(Path(args.base))
    rows = held_out_rows(args.held_out)
    result = {"rows": len(rows), "steps": args.steps}
    with torch.no_grad():
        for name, final in (("trained", args.run_dir / "final"), ("floor", None))[: 1 if args.no_floor else 2]:
            result[name] = score(edit_pipeline(args.base, final), family, rows, args.held_out, args.size, args.steps,
                                 args.seed)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
