"""LoRA, single-file and DreamBooth checked from outside: the CLI as a user runs it on a
tiny SD pipeline and a folder of images with .txt captions, the results read by diffusers.

    python benchmarks/methods/check_exports.py [WORK_DIR]

Prints: the LoRA run's final/ files and how much load_lora_weights changes the image;
the largest pixel difference between from_single_file and the diffusers folder; the
number of class images a DreamBooth run with prior preservation generated.
"""

import os
import shutil
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image, ImageDraw

from difftune.families.sd.tiny import build_tiny_sd

root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/check-exports")
shutil.rmtree(root, ignore_errors=True)
root.mkdir(parents=True)
base = build_tiny_sd(
    root / "base", ["red", "blue", "green", "square", "on", "dog", "photo", "a", "of"], size="test", seed=0
)
data = root / "photos"
data.mkdir()
for i in range(8):
    img = Image.new("RGB", (64, 64), "blue")
    ImageDraw.Draw(img).rectangle((8 + i, 8, 40 + i, 40), fill="red")
    img.save(data / f"{i}.png")
    (data / f"{i}.txt").write_text("a red square on blue")


def cli(*args):
    done = subprocess.run([sys.executable, "-m", "difftune", *args], capture_output=True, text=True)
    print("$ difftune", " ".join(args), "->", done.returncode)
    if done.returncode:
        print(done.stderr[-3000:])
        sys.exit(1)


toml = root / "lora.toml"
toml.write_text(f'''[model]
pretrained = "{base}"
[method]
kind = "lora"
[method.lora]
rank = 4
[data]
path = "{data}"
resolution = 64
[train]
output_dir = "{root / "lora-run"}"
batch_size = 4
max_steps = 20
learning_rate = 1e-3
lr_warmup_steps = 0
report_to = "none"
''')
cli("train", str(toml))


def image(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        "a red square on blue",
        num_inference_steps=4,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images[0]


pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
before = image(pipe)
pipe.load_lora_weights(root / "lora-run" / "final")
after = image(pipe)
print(
    "LoRA: files",
    sorted(p.name for p in (root / "lora-run" / "final").iterdir()),
    "max |after - before| =",
    float(np.abs(after - before).max()),
)
cli("export", "single-file", str(base), str(root / "sd.safetensors"))
folder = image(
    StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
)
single = StableDiffusionPipeline.from_single_file(
    str(root / "sd.safetensors"), config=str(base), safety_checker=None, requires_safety_checker=False
)
print("single-file: max |single - folder| =", float(np.abs(image(single) - folder).max()))
db = root / "db.toml"
db.write_text(f'''[model]
pretrained = "{base}"
[method]
kind = "dreambooth"
[method.dreambooth]
instance_prompt = "a photo of red dog"
class_data = "{root / "class"}"
class_prompt = "a photo of dog"
prior_preservation = true
num_class_images = 6
class_generation_steps = 4
[data]
path = "{data}"
resolution = 64
[train]
output_dir = "{root / "db-run"}"
batch_size = 2
max_steps = 6
learning_rate = 1e-4
lr_warmup_steps = 0
report_to = "none"
''')
for txt in data.glob("*.txt"):
    txt.unlink()
cli("train", str(db))
print(
    "DreamBooth: class images",
    len(list((root / "class").glob("*.png"))),
    "final",
    sorted(p.name for p in (root / "db-run" / "final").iterdir()),
)
