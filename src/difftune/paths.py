"""Checks of the paths a command is given, before anything heavy is imported or loaded.

Each check raises a `UserError` that names the key or flag, the path, what was found and
what was expected: a model folder that is a data folder, an output directory that is a
file, an image path whose suffix no image format has. Only the standard library (and, for
Hub ids, huggingface_hub's cache lookup) is used, so a refusal comes back in well under
a second.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
from pathlib import Path

from difftune.errors import UserError
from difftune.rundir import RunDir, stands_for

# owner/name or name, as the Hub spells repository ids
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
DATA_HINTS = ("metadata.jsonl", "metadata.csv", "dataset_info.json", "state.json")


class PathError(UserError, ValueError):
    """A path given in the config or on the command line that cannot be used."""


def looks_like_path(value: str) -> bool:
    """A value meant as a local path (not a Hub id), whether or not it exists."""
    return value.startswith((".", "/", "~")) or not HUB_ID.match(value)


# --- models ---------------------------------------------------------------------------


def check_pipeline(key: str, value: str, components: dict[str, str], variant: str | None = None,
                   revision: str | None = None) -> None:
    """A diffusers pipeline folder (model_index.json, and each component the family
    loads, with its config and, for models, weights) or a Hub id that can be reached.
    `components` maps subfolder -> kind ("model", "tokenizer" or "scheduler")."""
    if _hub_or_missing(key, value, "model_index.json", revision, "a diffusers pipeline folder"):
        return
    folder = Path(value).expanduser()
    index = folder / "model_index.json"
    if not index.is_file():
        raise PathError(f"{key} = {value!r}: {_what_is(folder)}; expected a diffusers pipeline folder "
                        "(with model_index.json and one subfolder per component)")
    try:
        listed = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:
        raise PathError(f"{key} = {value!r}: {index} is not readable JSON ({error})") from None
    problems = []
    for name, kind in components.items():
        if not isinstance(listed, dict) or not listed.get(name):
            problems.append(f"model_index.json lists no {name!r} component")
            continue
        problem = _component_problem(folder / name, kind, variant)
        if problem:
            problems.append(f"{name}/: {problem}")
    if problems:
        raise PathError(f"{key} = {value!r} is not a complete pipeline: " + "; ".join(problems))


def check_model_folder(key: str, value: str, class_hint: str, variant: str | None = None,
                       revision: str | None = None) -> None:
    """A single-model folder (config.json naming a class that contains `class_hint`, and
    weights), or a Hub id. A difftune run directory stands for its final/ folder."""
    if _hub_or_missing(key, value, "config.json", revision, f"a {class_hint} folder"):
        return
    check_finished_run(key, value)
    folder = stands_for(Path(value).expanduser())
    problem = _component_problem(folder, "model", variant)
    if problem:
        raise PathError(f"{key} = {value!r}: {_what_is(folder) if not (folder / 'config.json').is_file() else problem}; "
                        f"expected a {class_hint} folder (config.json and weights)")
    found = _class_name(folder / "config.json")
    if class_hint not in (found or ""):
        raise PathError(f"{key} = {value!r} holds a {found or 'model of unknown class'}, not a {class_hint}")


# What a ControlNet copies from the UNet it was made from: another value means another kind of base.
CONTROLNET_SHAPE = ("in_channels", "block_out_channels", "cross_attention_dim", "addition_embed_type",
                    "joint_attention_dim", "pooled_projection_dim", "attention_head_dim", "num_attention_heads")


def check_controlnet_fits(key: str, controlnet: str, base: str, denoiser: str = "unet") -> None:
    """A ControlNet made for another kind of base (an SD 1.5 ControlNet on SDXL) is named
    here, from the configs, not as a shape error inside the first step. Local folders only."""
    def config(path: Path) -> dict | None:
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            return None
        return found if isinstance(found, dict) else None

    net = config(stands_for(Path(controlnet).expanduser()) / "config.json")
    unet = config(Path(base).expanduser() / denoiser / "config.json")
    if net is None or unet is None:
        return
    differ = [f"{name} {net.get(name)!r} (the base's {denoiser}: {unet.get(name)!r})"
              for name in CONTROLNET_SHAPE if net.get(name) != unet.get(name)]
    if differ:
        raise PathError(f"{key} = {controlnet!r} was made for another kind of base than model.pretrained: "
                        f"{'; '.join(differ)}")


def check_vae_fits(key: str, vae: str, base: str) -> None:
    """Another VAE makes latents the base's denoiser can take: as many channels, at the
    same downsampling, as the base's own VAE (local folders only)."""
    def shape(path: Path) -> tuple | None:
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
            if "temperal_downsample" in found:  # Qwen-Image's VAE: z_dim channels, one halving per entry
                return found.get("z_dim"), len(found["temperal_downsample"]) + 1
            return found.get("latent_channels"), len(found["block_out_channels"])
        except (ValueError, OSError, KeyError, TypeError, AttributeError):
            return None

    ours, theirs = shape(Path(vae).expanduser() / "config.json"), shape(Path(base).expanduser() / "vae" / "config.json")
    if ours is not None and theirs is not None and ours != theirs:
        raise PathError(f"{key} = {vae!r} makes latents of {ours[0]} channels at 1/{2 ** (ours[1] - 1)} size; the "
                        f"base's VAE (which its denoiser was trained on) makes {theirs[0]} at 1/{2 ** (theirs[1] - 1)}")


def check_tokenizer(key: str, value: str, revision: str | None = None) -> None:
    """A tokenizer folder (tokenizer files at its top) or a Hub id."""
    if _hub_or_missing(key, value, "tokenizer_config.json", revision, "a tokenizer folder"):
        return
    folder = Path(value).expanduser()
    problem = _component_problem(folder, "tokenizer", None)
    if problem:
        hint = f"; did you mean {folder / 'tokenizer'}?" if (folder / "tokenizer").is_dir() else ""
        raise PathError(f"{key} = {value!r}: {problem}{hint}")


def check_finished_run(key: str, value: str) -> None:
    """A difftune run directory given as a model must have its result (final/)."""
    if RunDir(Path(value)).unfinished():
        raise PathError(f"{key} = {value!r} is a difftune run that has not finished: it has no final/ yet. "
                        "Run `difftune train` on it again to finish it")


def check_not_an_input(key: str, out: str | Path, inputs: dict[str, str | Path | None]) -> None:
    """An output that would write over an input (the same file, or a path inside an input
    folder: a report into the dataset, an export into the run it reads) is refused."""
    target = Path(out).expanduser().resolve()
    for name, value in inputs.items():
        source = Path(value).expanduser() if value else None
        if source is None or not source.exists():
            continue
        source = source.resolve()
        if target == source or (source.is_dir() and source in target.parents):
            raise PathError(f"{key} = {str(out)!r} would write over {name} {str(value)!r}; give a path outside it")


def _component_problem(folder: Path, kind: str, variant: str | None) -> str | None:
    if not folder.is_dir():
        return "missing" if not folder.exists() else "not a folder"
    names = {f.name for f in folder.iterdir()}
    if kind == "scheduler":
        return None if "scheduler_config.json" in names else "no scheduler_config.json"
    if kind == "tokenizer":
        known = {"tokenizer_config.json", "tokenizer.json", "vocab.json", "spiece.model", "vocab.txt"}
        return None if names & known else "no tokenizer files (tokenizer_config.json, vocab.json, ...)"
    if "config.json" not in names:
        return "no config.json"
    weights = [folder / n for n in names if n.endswith(WEIGHT_SUFFIXES) or n.endswith(".index.json")]
    if variant:
        weights = [w for w in weights if f".{variant}." in w.name]
    if not weights:
        wanted = f"{variant} " if variant else ""
        return f"no {wanted}weights (*.safetensors or *.bin)"
    empty = [w.name for w in weights if w.is_file() and w.stat().st_size == 0]
    return f"empty weight file {empty[0]}" if empty else None


def _class_name(config: Path) -> str | None:
    try:
        found = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
    except (ValueError, OSError, AttributeError):
        return None
    return found if isinstance(found, str) else None


def _what_is(folder: Path) -> str:
    """What a folder that is not the expected model looks like, in a few words."""
    if not folder.exists():
        return "no such folder"
    if not folder.is_dir():
        return "a file, not a folder"
    names = {f.name for f in folder.iterdir()}
    if not names:
        return "an empty folder"
    if names & set(DATA_HINTS) or any(n.endswith((".parquet", ".arrow", ".jsonl")) for n in names):
        return "a dataset folder"
    if "model_index.json" in names:
        return "a whole pipeline folder, not a single model"
    if "config.json" in names:
        found = _class_name(folder / "config.json")
        return f"a single model folder ({found or 'config.json'}), not a whole pipeline"
    return "not a model folder (no model_index.json or config.json)"


def _hub_or_missing(key: str, value: str, probe: str, revision: str | None, expected: str) -> bool:
    """True when `value` is a Hub id to load from the Hub (it is reachable or cached);
    raises for an empty value, a missing local path, or a Hub id that cannot be had;
    False for an existing local path (the caller checks its contents)."""
    if not value.strip():
        raise PathError(f"{key} is empty; expected {expected} or a Hub id")
    if Path(value).expanduser().exists():
        return False
    if looks_like_path(value):
        raise PathError(f"{key} = {value!r}: no such folder")
    problem = hub_problem(value, probe, revision)
    if problem:
        raise PathError(f"{key} = {value!r}: not a local folder, and {problem}")
    return True


def offline_if_hub_unreachable() -> str | None:
    """When the Hub cannot be reached (no network, no DNS), switch this process to the
    local Hub cache at once (HF_HUB_OFFLINE), instead of letting each library retry for
    half a minute before it looks there. Returns a note to print, or None. Must run before
    huggingface_hub is imported to take effect (the CLI does so)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return None
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    name, _, port = host.partition(":")
    try:
        socket.create_connection((name, int(port or 443)), timeout=3).close()
    except OSError as error:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        return f"the Hub ({host}) cannot be reached ({error.strerror or type(error).__name__}): using the local cache only"
    return None


def hub_problem(repo_id: str, probe: str, revision: str | None) -> str | None:
    """Why a Hub repository cannot be loaded now (None: it is cached or reachable)."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, probe, revision=revision)
    if isinstance(cached, str):
        return None
    if constants.HF_HUB_OFFLINE:
        return "it is not in the local Hub cache (HF_HUB_OFFLINE is set: download it once while online)"
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        HfApi().model_info(repo_id, revision=revision, timeout=10)
    except GatedRepoError:
        return "it is gated on the Hub: accept its terms on its page, then `hf auth login`"
    except RepositoryNotFoundError:
        return "no such model on the Hub (or it is private: `hf auth login`)"
    except RevisionNotFoundError:
        return f"the Hub repository has no revision {revision!r}"
    except Exception as error:
        return f"the Hub cannot be reached ({type(error).__name__}) and it is not cached"
    return None


def within(path: Path, folder: Path) -> bool:
    """`path` is `folder` or lies inside it (both resolved: links followed)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


# --- LoRA files -----------------------------------------------------------------------

LORA_FILE = "pytorch_lora_weights.safetensors"
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
LORA_KEY = re.compile(r"(lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up|lora_linear_layer)\.")
KOHYA_KEY = re.compile(r"^lora_(unet|te\d?)_")
LORA_COMPONENTS = ("unet.", "text_encoder.", "text_encoder_2.", "transformer.")


def lora_file(key: str, value: str) -> Path:
    """The LoRA weights file of a run directory, its final/ folder, or the file itself,
    checked to be a safetensors file that holds LoRA weights (from its header alone)."""
    path = Path(value).expanduser()
    check_finished_run(key, value)
    found = next((c for c in (path, path / LORA_FILE, RunDir(path).final / LORA_FILE) if c.is_file()), None)
    if found is None:
        what = "no such file or folder" if not path.exists() else f"no {LORA_FILE} here, in it or in its final/"
        raise PathError(f"{key} = {value!r}: {what}")
    names = [name for name in safetensors_names(key, found) if LORA_KEY.search(name)]
    if not names:
        raise PathError(f"{key} = {value!r}: {found} holds no LoRA weights")
    if not any(name.startswith(LORA_COMPONENTS) or KOHYA_KEY.match(name) for name in names):
        raise PathError(f"{key} = {value!r}: {found} holds adapter weights without the component prefix a "
                        "pipeline needs (unet., text_encoder.): a checkpoint's adapter file. The run's final/ "
                        "holds the loadable file: finish the run with `difftune train`")
    return found


def is_kohya(path: Path) -> bool:
    return any(KOHYA_KEY.match(name) for name in safetensors_names("file", path))


def safetensors_names(key: str, path: Path) -> list[str]:
    """The tensor names of a safetensors file, read from its header (8 bytes of length,
    then JSON) without loading anything; a PathError when it is not such a file."""
    problem = "it is too short"
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            size = path.stat().st_size
            if 8 < size and 0 < length <= min(size - 8, 100 * 2**20):
                header = json.loads(handle.read(length))
                if isinstance(header, dict):
                    return [name for name in header if name != "__metadata__"]
            problem = "its header does not read"
    except (OSError, ValueError) as error:
        problem = f"{type(error).__name__}: {error}"
    raise PathError(f"{key}: {path} is not a safetensors file ({problem})")


def default_cache_dir() -> Path:
    """Where the encoded cache lives unless data.encoded_cache_dir says otherwise."""
    return Path(os.environ.get("DIFFTUNE_CACHE", Path.home() / ".cache" / "difftune")) / "encoded"


# --- outputs --------------------------------------------------------------------------


def check_output_dir(key: str, value: str) -> Path:
    """A directory difftune may create and write in: not a file, not under a file, on a
    writable disk. Nothing is created here."""
    if not value.strip():
        raise PathError(f"{key} is empty; give the directory to write into")
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise PathError(f"{key} = {value!r} is a file, not a directory")
    _check_writable_place(key, value, path)
    return path


def check_output_file(key: str, value: str, suffixes: tuple[str, ...] | None = None, overwrite: bool = False
                      ) -> Path:
    """A file difftune may write (its folder is made if missing): not a directory, with a
    suffix from `suffixes` when given, not inside a model folder, and not an existing file
    unless `overwrite` (the user said --overwrite)."""
    if not value.strip():
        raise PathError(f"{key} is empty; give the file to write")
    path = Path(value).expanduser()
    if path.is_dir() or value.endswith(("/", os.sep)):
        raise PathError(f"{key} = {value!r} is a directory; give a file name")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise PathError(f"{key} = {value!r}: the file name must end in one of {', '.join(suffixes)}")
    _check_writable_place(key, value, path.parent)
    model = next((folder for folder in (path.parent, path.parent.parent)
                  if (folder / "model_index.json").is_file() or (folder / "config.json").is_file()), None)
    if model is not None:
        raise PathError(f"{key} = {value!r} is inside the model folder {str(model)!r}: it would mix with, or "
                        "write over, its weights. Give a path outside it.")
    if path.exists() and not overwrite:
        raise PathError(f"{key} = {value!r} exists; give --overwrite to replace it, or another name")
    return path


def _check_writable_place(key: str, value: str, folder: Path) -> None:
    """`folder` exists and takes a new file, or can be made under a folder that does."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise PathError(f"{key} = {value!r}: {existing} is a file, so nothing can be made under it")
    problem = _write_problem(existing)
    if problem:
        raise PathError(f"{key} = {value!r}: cannot write in {existing} ({problem})")


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _write_problem(folder: Path) -> str | None:
    """Why nothing can be written in `folder` (tried, not guessed: root ignores modes)."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".difftune-write-test-"):
            pass
    except OSError as error:
        return error.strerror or type(error).__name__
    return None
