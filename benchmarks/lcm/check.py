"""Score an LCM-LoRA distilled from the fill-circles base, apart from training (issue 28).

Four variants of diffusers' own StableDiffusionPipeline on the captions of the held-out
fill-circles rows (the first N of assets/fill-circles/held-out), each prompt with its own
fixed seed (seed + its index: the same starting latents for every variant, whatever the
batching):

- teacher@25: the base (assets/fill-circles-base) at 25 steps with its usual sampler,
  UniPC (as difftune validates SD), at guidance 4 (what the base's fill-circles
  benchmarks use: train_base.py's validation, fill_circles/check.py, the demo presets);
- teacher@4: the same sampler and guidance at 4 steps;
- teacher_ddim_trailing@4: the teacher at 4 DDIM steps from t = 999 (trailing spacing), a
  stronger few-step floor than UniPC's leading spacing, whose 4 steps start at t = 801;
- base_lcm_sampler@4: the base alone sampled as the LCM is (LCMScheduler, 4 steps,
  guidance 1): what the sampler gives without the LoRA;
- lcm@4: the base + the run's LoRA (load_lora_weights of RUN/final) with LCMScheduler
  at 4 steps, guidance 1.

The metric (here, not in src/: text-to-image has no target disc to score against):

- colour_iou, the prompt-colour IoU: the disc is what stands apart from the image's border
  colour (metrics.standout_mask), the colour mask the pixels nearer the prompted circle
  colour than the prompted background colour (metrics.colour_mask with caption_colours);
  colour_iou = IoU(colour mask, disc), and 0 when nothing stands out (a blank image
  would otherwise be IoU(empty, empty) = 1);
- background_accuracy: the border's median colour is nearest the prompted background
  among the 8 palette colours;
- disc_colour_accuracy: the disc's median colour is nearest the prompted circle colour.

The bar: lcm@4's mean colour IoU is at least 90% of teacher@25's (summary.bar_met);
teacher@4 should score clearly lower (its own ratio to teacher@25, and whether it misses
the same bar).

    python benchmarks/lcm/check.py RUN_DIR [--prompts N] [--seeds-per-prompt K] [--out RESULT.json] [--grid GRID.png]
    python benchmarks/lcm/check.py --out RESULT.json      # the teacher's rows alone, no run
    python benchmarks/lcm/check.py --sanity               # the metric on known images

Sanity (--sanity, the 64 held-out rows, 2026-12-06), mean colour IoU / background accuracy:

| images scored with the held-out captions | colour IoU | background |
|---|---|---|
| the held-out targets themselves | 1.000 (min 1.000) | 1.000 |
| the targets encoded and decoded by the base's VAE (the best a generation can be) | 0.938 (min 0.798) | 1.000 |
| the targets, circle and background colours swapped in the caption | 0.000 | 0.000 |
| the prompted background alone (no disc) | 0.000 | 1.000 |
| uniform grey | 0.000 | 0.156 |
| uniform RGB noise | 0.447 | 0.156 |

Noise is not near 0: its border's median is grey, so most pixels "stand apart", and about
half of them are nearer either prompted colour. An image scores near 1 only when the
pixels that stand apart from its border are those of the prompted circle colour. Read
colour IoU beside background accuracy (noise: 0.16) and against the floors in the same
result (teacher@4, base_lcm_sampler@4).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageColor

from difftune.data.synthetic import DEMO_PALETTE
from difftune.metrics import CAPTION, caption_colours, colour_mask, iou, standout_mask

BAR = 0.9
PALETTE_RGB = {name: np.array(ImageColor.getrgb(name), dtype=np.float32) / 255 for name in DEMO_PALETTE}


def nearest_palette_colour(pixels: np.ndarray) -> str:
    """The palette name nearest the median colour of some pixels (N x 3, in [0, 1])."""
    median = np.median(pixels, axis=0)
    return min(PALETTE_RGB, key=lambda name: float(np.linalg.norm(PALETTE_RGB[name] - median)))


def border(array: np.ndarray) -> np.ndarray:
    return np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])


def prompt_colour_scores(image: Image.Image, prompt: str) -> dict[str, float]:
    """colour_iou, background_accuracy and disc_colour_accuracy of one generated image."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    colours = caption_colours(prompt)
    match = CAPTION.match(prompt.lower())
    if colours is None or match is None:
        raise ValueError(f"{prompt!r} is not '<colour> circle with <colour> background'")
    disc = standout_mask(array)
    colour_iou = iou(colour_mask(array, *colours), disc) if disc.any() else 0.0
    return {
        "colour_iou": colour_iou,
        "background_accuracy": float(nearest_palette_colour(border(array)) == match["bg"]),
        "disc_colour_accuracy": float(disc.any() and nearest_palette_colour(array[disc]) == match["fg"]),
    }


def per_prompt_colour_iou(scores: list[dict[str, float]], prompts: int) -> list[float]:
    """Each prompt's mean colour IoU over its seeds (image i is prompt i % prompts)."""
    return [float(np.mean([s["colour_iou"] for s in scores[i::prompts]])) for i in range(prompts)]


def summarise(scores: list[dict[str, float]], prompts: int | None = None) -> dict[str, float]:
    """Means over every image; the colour IoU's standard error over the prompts' own means
    (several seeds of one prompt are not independent draws)."""
    keys = scores[0].keys()
    means = {key: round(float(np.mean([s[key] for s in scores])), 4) for key in keys}
    prompts = prompts or len(scores)
    per_prompt = per_prompt_colour_iou(scores, prompts)
    means["colour_iou_stderr"] = round(float(np.std(per_prompt, ddof=1) / np.sqrt(prompts)), 4) \
        if prompts > 1 else float("nan")
    return means


def held_out(path: str, count: int | None) -> tuple[list[str], list[Image.Image]]:
    import datasets

    rows = datasets.load_dataset(path, split="train")
    count = len(rows) if count is None else min(count, len(rows))
    return list(rows["text"][:count]), [image.convert("RGB") for image in rows["image"][:count]]


def variants(base: str, run_dir: Path | None, teacher_steps: int, few_steps: int,
             guidance: float) -> dict[str, tuple]:
    """name -> (pipeline, steps, guidance): loaded as a user of the result would."""
    from diffusers import DDIMScheduler, LCMScheduler, StableDiffusionPipeline, UniPCMultistepScheduler

    teacher = StableDiffusionPipeline.from_pretrained(base, torch_dtype=torch.float32)
    teacher.scheduler = UniPCMultistepScheduler.from_config(teacher.scheduler.config)
    # The teacher's best few-step sampler found here: DDIM from t = 999 ("trailing"), where the
    # base's leading spacing starts 4 UniPC steps at t = 801, from pure noise that is no sample of t = 801.
    ddim = StableDiffusionPipeline(**(teacher.components | {
        "scheduler": DDIMScheduler.from_config(teacher.scheduler.config, timestep_spacing="trailing")}))
    # The base alone sampled as the LCM is (LCMScheduler, guidance 1): what the LoRA adds.
    base_lcm = StableDiffusionPipeline(**(teacher.components | {
        "scheduler": LCMScheduler.from_config(teacher.scheduler.config)}))
    chosen = {f"teacher@{teacher_steps}": (teacher, teacher_steps, guidance),
              f"teacher@{few_steps}": (teacher, few_steps, guidance),
              f"teacher_ddim_trailing@{few_steps}": (ddim, few_steps, guidance),
              f"base_lcm_sampler@{few_steps}": (base_lcm, few_steps, 1.0)}
    if run_dir is not None:
        lcm = StableDiffusionPipeline.from_pretrained(base, torch_dtype=torch.float32)
        lcm.load_lora_weights(str(run_dir / "final"))
        lcm.scheduler = LCMScheduler.from_config(lcm.scheduler.config)
        chosen[f"lcm@{few_steps}"] = (lcm, few_steps, 1.0)
    for pipe, _, _ in chosen.values():
        pipe.set_progress_bar_config(disable=True)
    return chosen


def generate(pipe, prompts: list[str], steps: int, guidance: float, seed: int, size: int,
             chunk: int) -> list[Image.Image]:
    """Every prompt with its own generator (seed + index), in chunks."""
    images = []
    for start in range(0, len(prompts), chunk):
        texts = prompts[start:start + chunk]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(texts))]
        images += pipe(texts, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                       generator=generators).images
    return images


def write_grid(path: Path, columns: dict[str, list[Image.Image]], rows: int, zoom: int = 4) -> None:
    """One row per prompt, one column per variant (nearest-neighbour zoom)."""
    names = list(columns)
    size = columns[names[0]][0].size[0] * zoom
    grid = Image.new("RGB", (size * len(names), size * rows), "grey")
    for x, name in enumerate(names):
        for y, image in enumerate(columns[name][:rows]):
            grid.paste(image.resize((size, size), Image.Resampling.NEAREST), (x * size, y * size))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def run_record(run_dir: Path) -> dict:
    """What the run trained (its config.toml) and how long it stepped (events.jsonl)."""
    record: dict = {"run_dir": str(run_dir)}
    config_path = run_dir / "config.toml"
    if config_path.exists():
        config = tomllib.loads(config_path.read_text())
        train, lora = config.get("train", {}), config.get("method", {}).get("lora", {})
        record |= {"max_steps": train.get("max_steps"), "batch_size": train.get("batch_size"),
                   "learning_rate": train.get("learning_rate"), "lora_rank": lora.get("rank"),
                   "distill": config.get("method", {}).get("distill")}
    events_path = run_dir / "events.jsonl"
    if events_path.exists():
        events = [json.loads(line) for line in events_path.read_text().splitlines() if line.strip()]
        first = {}
        for event in events:
            first.setdefault(event.get("event"), event)
        steps = [e for e in events if e.get("event") == "step"]
        if "start" in first and "final" in first:
            wall = first["final"]["time"] - first["start"]["time"]
            validating = sum(e.get("seconds", 0.0) for e in events
                             if e.get("event") == "validation" and e["time"] <= first["final"]["time"])
            record["training_minutes"] = round(wall / 60, 2)  # first step to final/, validations included
            record["stepping_minutes"] = round((wall - validating) / 60, 2)
        if steps:
            record["last_step"] = steps[-1]["step"]
            rates = [e["samples_per_s"] for e in steps if "samples_per_s" in e]
            if rates:
                record["samples_per_s_median"] = round(float(np.median(rates)), 2)
    return record


def vae_round_trip(base: str, images: list[Image.Image]) -> list[Image.Image]:
    """The images encoded and decoded by the base's VAE: the best a generated image can be."""
    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor

    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    processor = VaeImageProcessor()
    with torch.no_grad():
        pixels = processor.preprocess(images)
        decoded = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
    return processor.postprocess(decoded, output_type="pil")


def sanity(held_out_path: str, base: str) -> dict:
    """The metric on images with known answers: the held-out targets (near 1), the same
    through the base's VAE, the same with the caption's colours swapped, the prompted
    background alone, grey, noise (near 0)."""
    prompts, targets = held_out(held_out_path, None)
    swapped = [CAPTION.sub(lambda m: f"{m['bg']} circle with {m['fg']} background", p) for p in prompts]
    size = targets[0].size
    noise_rng = np.random.default_rng(0)
    cases = {
        "targets": [prompt_colour_scores(t, p) for t, p in zip(targets, prompts)],
        "targets_through_vae": [prompt_colour_scores(t, p) for t, p in zip(vae_round_trip(base, targets), prompts)],
        "targets_colours_swapped": [prompt_colour_scores(t, p) for t, p in zip(targets, swapped)],
        "background_only": [prompt_colour_scores(Image.new("RGB", size, CAPTION.match(p)["bg"]), p) for p in prompts],
        "grey": [prompt_colour_scores(Image.new("RGB", size, (128, 128, 128)), p) for p in prompts],
        "noise": [prompt_colour_scores(Image.fromarray(noise_rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)), p)
                  for p in prompts],
    }
    result = {name: summarise(scores) for name, scores in cases.items()}
    for name in ("targets", "targets_through_vae"):
        result[name]["colour_iou_min"] = round(min(s["colour_iou"] for s in cases[name]), 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, nargs="?",
                        help="the distillation run (its final/ holds the LoRA); left out: the teacher's rows alone")
    parser.add_argument("--base", default="assets/fill-circles-base")
    parser.add_argument("--held-out", default="assets/fill-circles/held-out")
    parser.add_argument("--prompts", type=int, default=None, help="the first N held-out captions (default: all 64)")
    parser.add_argument("--teacher-steps", type=int, default=25)
    parser.add_argument("--few-steps", type=int, default=4)
    parser.add_argument("--guidance-scale", type=float, default=4.0, help="the teacher's classifier-free guidance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds-per-prompt", type=int, default=1,
                        help="images per caption: with C captions, image i is caption i %% C with seed SEED + i, so "
                        "the first C images are those of --seeds-per-prompt 1 (more: a smaller standard error)")
    parser.add_argument("--size", type=int, default=32, help="the base's training resolution")
    parser.add_argument("--chunk", type=int, default=16, help="prompts per pipeline call")
    parser.add_argument("--out", type=Path, default=None, help="the JSON result (default RUN_DIR/lcm-check.json)")
    parser.add_argument("--grid", type=Path, default=None, help="a PNG: a row per prompt (at most 16), a column "
                        "per variant (teacher@25, teacher@4, teacher_ddim_trailing@4, base_lcm_sampler@4, lcm@4), "
                        "the held-out target last")
    parser.add_argument("--sanity", action="store_true", help="score known images only (no run needed)")
    args = parser.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    if args.sanity:
        result = {"sanity": sanity(args.held_out, args.base), "command": command}
        print(json.dumps(result, indent=2))
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        return
    if args.run_dir is None and args.out is None:
        parser.error("without RUN_DIR (the teacher alone), --out is needed")

    started = time.perf_counter()
    prompts, targets = held_out(args.held_out, args.prompts)
    captions = len(prompts)
    prompts = prompts * args.seeds_per_prompt
    chosen = variants(args.base, args.run_dir, args.teacher_steps, args.few_steps, args.guidance_scale)
    load_seconds = time.perf_counter() - started
    images, results = {}, {}
    for name, (pipe, steps, guidance) in chosen.items():
        begun = time.perf_counter()
        images[name] = generate(pipe, prompts, steps, guidance, args.seed, args.size, args.chunk)
        seconds = time.perf_counter() - begun
        scores = [prompt_colour_scores(image, prompt) for image, prompt in zip(images[name], prompts)]
        results[name] = summarise(scores, captions) | {
            "steps": steps, "guidance_scale": guidance, "generate_seconds": round(seconds, 2),
            "scheduler": type(pipe.scheduler).__name__,
            "per_prompt_colour_iou": [round(value, 4) for value in per_prompt_colour_iou(scores, captions)]}
    teacher = results[f"teacher@{args.teacher_steps}"]["colour_iou"]
    teacher_few = results[f"teacher@{args.few_steps}"]["colour_iou"]
    teacher_few_ratio = teacher_few / teacher if teacher else float("nan")
    summary = {"bar": BAR, "teacher_few_over_teacher": round(teacher_few_ratio, 4),
               "teacher_few_misses_bar": bool(teacher_few_ratio < BAR)}
    if args.run_dir is not None:
        lcm = results[f"lcm@{args.few_steps}"]["colour_iou"]
        ratio = lcm / teacher if teacher else float("nan")
        floor = results[f"base_lcm_sampler@{args.few_steps}"]["colour_iou"]
        ddim_few = results[f"teacher_ddim_trailing@{args.few_steps}"]["colour_iou"]
        summary |= {"lcm_over_teacher": round(ratio, 4), "bar_met": bool(ratio >= BAR),
                    "teacher_ddim_trailing_few_over_teacher": round(ddim_few / teacher, 4) if teacher else None,
                    "lcm_minus_teacher_few": round(lcm - teacher_few, 4),
                    "lcm_minus_base_lcm_sampler": round(lcm - floor, 4)}
    result = {
        "benchmark": "LCM-LoRA distillation on fill-circles (issue 28)",
        "date": datetime.date.today().isoformat(),
        "command": command,
        "prompts": captions, "seeds_per_prompt": args.seeds_per_prompt, "seed": args.seed, "size": args.size,
        "base": args.base, "held_out": args.held_out,
        "run": run_record(args.run_dir) if args.run_dir else None,
        "variants": results,
        "summary": summary,
        "seconds": {"load": round(load_seconds, 2), "total": round(time.perf_counter() - started, 2)},
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
    }
    if args.grid:
        write_grid(args.grid, images | {"target": targets}, min(16, captions))
        result["grid"] = {"path": str(args.grid), "columns": [*images, "target"]}
    out = args.out or args.run_dir / "lcm-check.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    printed = {name: {k: v for k, v in r.items() if k != "per_prompt_colour_iou"} for name, r in results.items()}
    print(json.dumps({"variants": printed, "summary": summary, "seconds": result["seconds"], "out": str(out)},
                     indent=2))


if __name__ == "__main__":
    main()
