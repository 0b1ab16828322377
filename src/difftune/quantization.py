"""A frozen base held in 4 or 8 bits (model.quantize): every frozen nn.Linear of the
denoiser and the text encoders becomes bitsandbytes' NF4 (Dettmers et al. 2023, QLoRA)
or int8 (LLM.int8()) layer, or keeps its class with an fp8 weight (torchao's
float8 weight-only: e4m3 with a scale per row, dequantized for each matmul), quantized
from the loaded weights on the training device.

Why by hand: diffusers' and transformers' bitsandbytes loaders refuse to run without a
GPU, and bitsandbytes (>= 0.48) itself quantizes and runs on the CPU too; one path then
serves both. What trains stays full precision: LoRA adapters (peft wraps the frozen
layer, which is what gets quantized), a ControlNet (a module of its own), a Control
run's widened input projection. Convolutions and normalisations stay as they are.

It runs after the frozen parts are placed and cast (a quantized weight must not be cast
again: its bytes would be read as numbers), and only on parts that stay in use: text
encoders a text cache replaces are left alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

QUANTIZE_KINDS = ("nf4", "int8", "fp8")


def frozen_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear and not any(p.requires_grad for p in module.parameters())


def quantize_frozen_linears(module: nn.Module, kind: str, compute_dtype: torch.dtype) -> int:
    """Quantize every frozen nn.Linear inside `module` (peft's wrapped base layers
    included), in place: replaced by its bitsandbytes layer, or (fp8) its weight swapped
    for torchao's float8 tensor. Returns how many."""
    targets = []
    for path, parent in list(module.named_modules()):
        if ".lora_" in f".{path}":  # peft's adapters (lora_A, lora_B): they are what trains
            continue
        targets += [(parent, name, child) for name, child in parent.named_children()
                    if frozen_linear(child) and not name.startswith("lora_")]
    if kind == "fp8":
        _to_float8(module, {id(child) for _, _, child in targets})
    else:
        for parent, name, child in targets:
            setattr(parent, name, _quantized(child, kind, compute_dtype))
    return len(targets)


def _to_float8(module: nn.Module, targets: set[int]) -> None:
    """torchao's float8 weight-only quantization of the layers in `targets` (by id): the
    layer stays an nn.Linear (peft's wrapper keeps calling it), its weight becomes a
    Float8Tensor that F.linear dequantizes. Runs on the CPU too, where it saves memory,
    not time."""
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    quantize_(module, Float8WeightOnlyConfig(), filter_fn=lambda layer, _fqn: id(layer) in targets)


def _quantized(linear: nn.Linear, kind: str, compute_dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    device, bias = linear.weight.device, linear.bias is not None
    weight = linear.weight.data.to(torch.float32 if device.type == "cpu" else compute_dtype)
    if kind == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                                  quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type="nf4")
        # bitsandbytes repacks a 4-bit weight for its CPU inference kernel the first time an
        # eval-mode layer sees an input without grad; that layout needs out_features % 32 == 0
        # and is not the one backward uses. A frozen base sees both kinds of input in training.
        layer.support_avx512bf16_for_cpu = False
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                    threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
    if bias:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return layer.to(device)  # bitsandbytes quantizes on this move


def quantize_frozen_parts(parts: Any, kind: str, compute_dtype: torch.dtype, text_cached: bool) -> dict[str, int]:
    """The frozen linears of the denoiser and of every text encoder still in use, by part
    name -> how many were quantized."""
    names = [parts.denoiser_name] + ([] if text_cached else list(parts.text_encoder_names))
    counts = {}
    for name in names:
        module = parts.components.get(name)
        if isinstance(module, nn.Module):
            counts[name] = quantize_frozen_linears(module, kind, compute_dtype)
    return counts


def quantize_pipeline(pipe: Any, denoiser_name: str, kind: str, compute_dtype: torch.dtype) -> dict[str, int]:
    """A loaded pipeline's denoiser and text encoders (its LoRA adapters, if loaded, stay
    as they are), for generation."""
    counts = {}
    for name, module in pipe.components.items():
        if isinstance(module, nn.Module) and (name == denoiser_name or name.startswith("text_encoder")):
            module.requires_grad_(False)
            counts[name] = quantize_frozen_linears(module, kind, compute_dtype)
    return counts


def parameter_bytes(parameter: torch.Tensor) -> tuple[int, int]:
    """(the weights it stands for, the bytes it is stored in), scales included: a 4-bit
    weight is packed two to a uint8 and bitsandbytes keeps its logical shape in
    quant_state; torchao's Float8Tensor reports its logical shape and dtype and holds
    its fp8 data in qdata."""
    data = getattr(parameter, "qdata", None)
    if data is not None:  # fp8: one byte a weight and a scale per row
        scale = parameter.scale
        return parameter.numel(), data.numel() * data.element_size() + scale.numel() * scale.element_size()
    stored = parameter.numel() * parameter.element_size()
    state = getattr(parameter, "quant_state", None)
    if state is not None:  # NF4: a scale per block of 64
        return state.shape.numel(), stored + state.absmax.numel() * state.absmax.element_size()
    scales = getattr(parameter, "SCB", None)  # int8: a scale per row
    if scales is not None:
        stored += scales.numel() * scales.element_size()
    return parameter.numel(), stored


def bytes_per_parameter(module: nn.Module) -> float:
    """Bytes the module's weights take per parameter they stand for."""
    logical = stored = 0
    for parameter in module.parameters():
        count, size = parameter_bytes(parameter)
        logical, stored = logical + count, stored + size
    return stored / max(logical, 1)
