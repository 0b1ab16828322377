"""The engine a launch trains on: one process, DDP, or FSDP2, as accelerate's launch
config says (`accelerate launch --config_file configs/accelerate/fsdp2.yaml ...`).

Under FSDP2 each rank holds a shard of every trained weight (torch's `fully_shard`):
- the trained module is prepared alone with its optimizer (accelerate swaps the
  optimizer's parameters for the shards), the frozen parts stay whole on every rank;
- checkpoints are accelerate's sharded state (`pytorch_model_fsdp_0/`, written by every
  rank through torch.distributed.checkpoint), not the method's diffusers files;
- validation and `final/` need whole weights: every rank takes part in gathering them
  (`full_modules`), and the main process builds plain copies from them and uses those.

accelerate only picks FSDP on an accelerator; a CPU launch (gloo) of the same config
would silently train as DDP. `switch_cpu_job_to_fsdp2` turns it on there too (torch's
fully_shard runs on CPU tensors over gloo), so one code path is tested on CPU.
"""

from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING, Any

import torch

from difftune.errors import UserError

if TYPE_CHECKING:
    from accelerate import Accelerator


class EngineError(UserError, ValueError):
    """A launch config difftune cannot train with."""


def fsdp_requested() -> bool:
    """accelerate's launcher exports the launch config's FSDP settings to the processes."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def check_fsdp_version() -> None:
    version = os.environ.get("FSDP_VERSION", "1")
    if fsdp_requested() and version != "2":
        raise EngineError(f"the launch config asks for FSDP version {version}: difftune trains with FSDP2 only "
                          "(set fsdp_config.fsdp_version: 2, see configs/accelerate/fsdp2.yaml)")


def switch_cpu_job_to_fsdp2(accelerator: Accelerator) -> None:
    """A multi-process CPU job launched with an FSDP config: make accelerate shard with
    FSDP2 as it would on GPUs. accelerate keeps the engine in two shared states
    (AcceleratorState re-reads PartialState's), so both are set."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if not fsdp_requested() or accelerator.num_processes < 2 or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)  # the rest from the launcher's FSDP_* variables
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether no rank holds the trained weights whole: FSDP2, or DeepSpeed ZeRO-3
    (ZeRO-3 not yet run by the tests: DeepSpeed needs an accelerator)."""
    if getattr(accelerator, "is_fsdp2", False):
        return True
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def check_sharded_run(accelerator: Accelerator, trained_names: list[str]) -> None:
    """What FSDP2 through accelerate cannot do (yet), said before training starts."""
    if not is_sharded(accelerator):
        return
    if len(trained_names) > 1:
        raise EngineError(f"FSDP2 trains one module per run (accelerate prepares one model with its optimizer); "
                          f"this run trains {', '.join(trained_names)}: leave method.train_text_encoder off, "
                          "or launch with DDP (configs/accelerate/ddp.yaml)")


def set_wrapped_blocks(accelerator: Accelerator, module: torch.nn.Module, denoiser: torch.nn.Module) -> None:
    """With the transformer-based wrap policy and no classes named, shard block by block
    by the classes diffusers never splits (`_no_split_modules`) that the trained module
    holds: a ControlNet names none of its own (its UNet's are used), and a class named
    but absent makes accelerate fail."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = accelerator.state.fsdp_plugin
    if plugin is None or plugin.auto_wrap_policy is not transformer_auto_wrap_policy:
        return
    if plugin.transformer_cls_names_to_wrap:
        return
    names = [*(getattr(module, "_no_split_modules", None) or []), *(getattr(denoiser, "_no_split_modules", None) or [])]
    present = {type(m).__name__ for m in module.modules()}
    plugin.transformer_cls_names_to_wrap = [name for name in dict.fromkeys(names) if name in present]


def shard_frozen(module: torch.nn.Module) -> None:
    """Shard a frozen module over all ranks with torch's fully_shard, block by block (its
    `_no_split_modules` classes, innermost first, then the whole): a ControlNet run then
    holds a share of its frozen UNet per rank, not a whole copy. accelerate prepares one
    model per optimizer, so this one is sharded here; it has no optimizer state."""
    from torch.distributed.fsdp import fully_shard

    classes = set(getattr(module, "_no_split_modules", None) or [])
    blocks = [m for m in module.modules() if m is not module and type(m).__name__ in classes]
    for block in reversed(blocks):  # modules() lists a block before the blocks inside it
        fully_shard(block)
    fully_shard(module)


def broadcast_from_main(module: torch.nn.Module) -> None:
    """Every rank starts from the main process's weights, as DDP makes them: a module
    built with random parts (a ControlNet's conditioning embedding, LoRA's A matrices)
    draws them from each rank's own seed, and fully_shard would keep each rank's shard
    of its own draw."""
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def structure_of(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module with every parameter and buffer on the meta device: its
    structure (adapters included) without holding a second copy of the weights."""
    memo: dict[int, torch.Tensor] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = torch.nn.Parameter(meta, tensor.requires_grad) if isinstance(
            tensor, torch.nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def full_copy(accelerator: Accelerator, module: torch.nn.Module, structure: torch.nn.Module) -> torch.nn.Module | None:
    """The whole weights of a sharded module, gathered (every rank must call this), as a
    plain module on the main process; None elsewhere."""
    state = accelerator.get_state_dict(module)
    if not accelerator.is_main_process:
        return None
    plain = copy.deepcopy(structure).to_empty(device="cpu")
    missing, unexpected = plain.load_state_dict(state, strict=False)
    # FSDP2 shards parameters only: buffers (persistent or not) are whole on every rank.
    buffers = dict(module.named_buffers())
    for name, buffer in plain.named_buffers():
        buffer.copy_(buffers[name])
    missing = [name for name in missing if name not in buffers]
    if missing or unexpected:
        raise RuntimeError(f"the gathered weights do not fit the module: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return plain.to(accelerator.device)


class Engine:
    """What the training loop asks of the launch's engine, whatever it is: shard what
    the engine shards (a frozen denoiser too, under FSDP2), and give whole modules back
    for validation and final/ (a collective when sharded: every rank calls it)."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.sharded = is_sharded(accelerator)
        self.structures: dict[str, torch.nn.Module] = {}
        """Each trained module's structure, to rebuild whole copies from gathered weights."""
        self.frozen_structure: torch.nn.Module | None = None
        """The frozen denoiser's structure, when FSDP2 shards it."""

    def record(self) -> dict[str, Any]:
        """What a checkpoint records (engine.json): the process count and the engine."""
        processes = self.accelerator.num_processes
        return {"processes": processes, "engine": "fsdp2" if self.sharded else "ddp" if processes > 1 else "single"}

    def shard_frozen_denoiser(self, parts: Any, trained: dict[str, torch.nn.Module]) -> None:
        """Under FSDP2, a denoiser no method trains (a ControlNet's UNet) is sharded too."""
        if getattr(self.accelerator, "is_fsdp2", False) and all(m is not parts.denoiser for m in trained.values()):
            self.frozen_structure = structure_of(parts.denoiser)
            shard_frozen(parts.denoiser)

    def before_prepare(self, trained: dict[str, torch.nn.Module], denoiser: torch.nn.Module) -> None:
        check_sharded_run(self.accelerator, list(trained))
        if not self.sharded:
            return
        self.structures = {name: structure_of(m) for name, m in trained.items()}
        for module in trained.values():
            broadcast_from_main(module)
        set_wrapped_blocks(self.accelerator, next(iter(trained.values())), denoiser)

    def whole_modules(self, trained: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
        """The trained modules with their whole weights for the main process: themselves,
        or under sharding plain copies rebuilt from the gathered shards ({} elsewhere)."""
        if not self.sharded:
            return {name: self.accelerator.unwrap_model(m) for name, m in trained.items()}
        copies = {name: full_copy(self.accelerator, m, self.structures[name]) for name, m in trained.items()}
        return {name: m for name, m in copies.items() if m is not None}

    def whole_parts(self, parts: Any, denoiser_name: str) -> Any:
        """The frozen parts, with a whole copy of a sharded frozen denoiser on the main process."""
        if self.frozen_structure is None:
            return parts
        whole = full_copy(self.accelerator, parts.denoiser, self.frozen_structure)
        return parts.with_modules({denoiser_name: whole}) if whole is not None else parts
