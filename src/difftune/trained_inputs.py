"""What generate's trained-result flags name (--controlnet, --lora, --embedding, a run as
--base): which result a run made and the flag that takes it, and the files each result
needs, checked before anything heavy is imported; the Result that loads a --lora."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from difftune.errors import InputError
from difftune.paths import WEIGHT_FILE_SUFFIXES, check_finished_run, looks_like_path, lora_file
from difftune.results import (
    ADAPTER_CONFIG,
    EMBEDDINGS_FILE,
    RESULTS,
    adapter_parts,
    read_adapter_config,
    recognise,
    run_result,
)
from difftune.rundir import model_source, run_config, stands_for


def is_control_run(value: str | None) -> bool:
    """Whether a run's result runs in its family's control pipeline (a Control run, or a
    Control-LoRA), as its recorded [method] settings say."""
    return run_result(run_config(value)) in ("control", "control_lora")


def is_edit_run(value: str | None) -> bool:
    """Whether a run's result runs in its family's edit pipeline (an edit run or edit
    LoRA), as its recorded [method] settings say."""
    return run_result(run_config(value)) in ("edit", "edit_lora")


def check_run_result(flag: str, value: str | None) -> None:
    """A run directory given to the flag that takes what it made (a ControlNet run to
    --controlnet, a LoRA run to --lora, a full fine-tune to --base)."""
    if not value or run_config(value) is None:
        return
    made = recognise(stands_for(Path(value).expanduser()), run_result(run_config(value)))
    if made is not None and made.flag != flag:
        raise InputError(f"{flag} {value}: this run made {made.made}; give it as {made.flag}")


def check_lora(path: str) -> None:
    if not Path(path).exists() and not looks_like_path(path) and not path.endswith(WEIGHT_FILE_SUFFIXES):
        return  # a Hub id: load_lora_weights fetches it
    folder = stands_for(Path(path).expanduser())
    if RESULTS["adapter"].recognise(folder):  # LoKr / LoHa: peft's folders, one per part
        check_finished_run("--lora", path)
        for part in adapter_parts(folder):
            try:
                read_adapter_config(folder / part / ADAPTER_CONFIG)
            except ValueError as error:
                raise InputError(f"--lora {path}: {error}") from None
        return
    lora_file("--lora", path)


def check_embedding(path: str) -> None:
    check_finished_run("--embedding", path)
    folder = stands_for(Path(path).expanduser())
    if not RESULTS["embedding"].recognise(folder):
        what = "no such folder" if not folder.exists() else f"no {EMBEDDINGS_FILE} here or in its final/"
        raise InputError(f"--embedding {path}: {what}")


def attached_result(value: str, default: str) -> Any:
    """The Result a --lora names: peft adapters (LoKr, LoHa) where its folder holds them,
    else a LoRA file (a file, a folder or a Hub id load_lora_weights reads)."""
    folder = Path(model_source(value))
    return RESULTS["adapter"] if RESULTS["adapter"].recognise(folder) else RESULTS[default]
