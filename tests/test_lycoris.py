"""peft LoHa/LoKr states in LyCORIS names (difftune.export.lycoris): the delta each exported
module merges to, by ComfyUI's formula (comfy/weight_adapter/loha.py and lokr.py,
calculate_weight) written here independently, is peft's own get_delta_weight, for a tiny
UNet's attention linears and 3x3/1x1 convs and a tiny CLIP text encoder."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoHaConfig, LoKrConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.loha.layer import LoHaLayer
from peft.tuners.lokr.layer import LoKrLayer
from safetensors.torch import load, save
from transformers import CLIPTextConfig, CLIPTextModel

from difftune.export.lycoris import to_lycoris

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"]
CONVS = ["conv_in", "conv1", "conv2", "conv_shortcut", "proj_in"]  # 3x3; 1x1 (conv_shortcut, proj_in)
UNET = ATTENTION + CONVS


def unet_name(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def te_name(module: str) -> str:
    return "lora_te_" + module.replace(".", "_")


def lycoris_delta(tensors: dict[str, torch.Tensor], weight_shape: torch.Size) -> torch.Tensor:
    """ComfyUI's merge of one LyCORIS module, `tensors` keyed by the part after the module
    name (`hada_w1_a`, ..., `alpha`).

    LoHa: (w1_a @ w1_b) * (w2_a @ w2_b), or with Tucker cores t1/t2 each side rebuilt as
    einsum("ijkl,jr,ip->prkl", t, w_b, w_a); scaled by alpha / w1_b.shape[0] (1 without alpha).
    LoKr: kron(w1, w2), each side the full matrix or a_b product (w2 with t2: the Tucker
    rebuild); w1 gets two unit axes when w2 is 4-d; scaled by alpha / w_b.shape[0] of the
    factorised side (w2's when both are), and by 1 when neither side is factorised or
    there is no alpha. The product is reshaped to the weight's shape."""
    names = set(tensors)
    alpha = tensors["alpha"].item() if "alpha" in tensors else None
    if "hada_w1_a" in names:
        assert names <= {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"}, names

        def side(i: int) -> torch.Tensor:
            a, b = tensors[f"hada_w{i}_a"].double(), tensors[f"hada_w{i}_b"].double()
            if f"hada_t{i}" in tensors:
                return torch.einsum("ijkl,jr,ip->prkl", tensors[f"hada_t{i}"].double(), b, a)
            return a @ b

        scale = 1.0 if alpha is None else alpha / tensors["hada_w1_b"].shape[0]
        return (side(1) * side(2)).reshape(weight_shape) * scale
    assert names <= {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
                     "alpha"}, names
    rank = None
    if "lokr_w1" in names:
        w1 = tensors["lokr_w1"].double()
    else:
        w1 = tensors["lokr_w1_a"].double() @ tensors["lokr_w1_b"].double()
        rank = tensors["lokr_w1_b"].shape[0]
    if "lokr_w2" in names:
        w2 = tensors["lokr_w2"].double()
    else:
        a, b = tensors["lokr_w2_a"].double(), tensors["lokr_w2_b"].double()
        w2 = torch.einsum("ijkl,jr,ip->prkl", tensors["lokr_t2"].double(), b, a) if "lokr_t2" in names else a @ b
        rank = b.shape[0]
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    scale = alpha / rank if alpha is not None and rank is not None else 1.0
    return torch.kron(w1, w2).reshape(weight_shape) * scale


def tiny_unet() -> UNet2DConditionModel:
    """Channels 32 and 64 so that LoKr factorises (32 = 4x8, 64 = 8x8) at small ranks."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=8)


def tiny_text_encoder() -> CLIPTextModel:
    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                        num_hidden_layers=2, vocab_size=64, max_position_embeddings=16))


def adapted(model: torch.nn.Module, config: LoHaConfig | LoKrConfig) -> dict[str, torch.nn.Module]:
    """The model with the adapter injected and every adapter tensor random (peft zeroes one
    factor), as {module path: peft layer}."""
    if isinstance(model, UNet2DConditionModel):
        model.add_adapter(config)  # as difftune's LoRA methods inject into a UNet
    else:
        inject_adapter_in_model(config, model)
    generator = torch.Generator().manual_seed(1)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (LoHaLayer, LoKrLayer))}
    assert layers
    with torch.no_grad():
        for layer in layers.values():
            for attribute in layer.adapter_layer_names:
                for p in getattr(layer, attribute).values():
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return layers


def saved_config(config: LoHaConfig | LoKrConfig) -> dict:
    """The config as a run saves it: to_dict() through JSON."""
    return json.loads(json.dumps(config.to_dict(), default=sorted))


def check_exact(model: torch.nn.Module, config: LoHaConfig | LoKrConfig,
                name: Callable[[str], str]) -> dict[str, dict[str, torch.Tensor]]:
    """Export the model's adapter and compare each module's ComfyUI delta with peft's;
    returns the exported tensors per module path."""
    layers = adapted(model, config)
    state = get_peft_model_state_dict(model)
    exported = load(save(to_lycoris(state, saved_config(config), name)))  # through a safetensors file
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    for path, layer in layers.items():
        prefix = name(path) + "."
        tensors = {key[len(prefix):]: t for key, t in exported.items() if key.startswith(prefix)}
        assert "alpha" in tensors and tensors["alpha"].ndim == 0, path
        assert all(t.is_contiguous() for t in tensors.values())
        weight = layer.get_base_layer().weight
        with torch.no_grad():
            expected = layer.get_delta_weight("default").double()
        got = lycoris_delta(tensors, weight.shape)
        assert expected.abs().max() > 0
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item(),
                                   msg=lambda m, p=path: f"{p}: {m}")
        per_module[path] = tensors
    assert sum(len(t) for t in per_module.values()) == len(exported), "keys outside the adapted modules"
    return per_module


def kinds(per_module: dict[str, dict[str, torch.Tensor]]) -> set[frozenset[str]]:
    return {frozenset(t) - {"alpha"} for t in per_module.values()}


def test_loha_with_alpha_not_r_on_linears_and_flat_convs() -> None:
    out = check_exact(tiny_unet(), LoHaConfig(r=2, alpha=5, target_modules=UNET), unet_name)
    assert kinds(out) == {frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})}
    assert {t["alpha"].item() for t in out.values()} == {5.0}
    conv = out["down_blocks.0.resnets.0.conv1"]
    assert conv["hada_w1_b"].shape == (2, 32 * 9)  # the kernel flattened into the input axis


def test_loha_effective_conv_with_rank_and_alpha_patterns() -> None:
    config = LoHaConfig(r=2, alpha=3, target_modules=UNET, use_effective_conv2d=True,
                        rank_pattern={"conv2": 3, "to_v": 4},
                        alpha_pattern={"to_k": 1.5, "down_blocks.1.resnets.0.conv1": 7})
    out = check_exact(tiny_unet(), config, unet_name)
    conv = out["down_blocks.0.resnets.0.conv1"]
    assert conv["hada_t1"].shape == (2, 2, 3, 3) and conv["hada_w1_a"].shape == (2, 32)
    shortcut = out["down_blocks.1.resnets.0.conv_shortcut"]  # 1x1: peft keeps it flat
    assert "hada_t1" not in shortcut and shortcut["hada_w1_a"].shape == (64, 2)
    assert out["down_blocks.0.resnets.0.conv2"]["hada_t1"].shape == (3, 3, 3, 3)
    assert out["down_blocks.1.resnets.0.conv1"]["alpha"].item() == 7.0
    assert out["mid_block.attentions.0.transformer_blocks.0.attn1.to_k"]["alpha"].item() == 1.5
    assert out["mid_block.attentions.0.transformer_blocks.0.attn1.to_v"]["hada_w1_b"].shape[0] == 4


def test_lokr_full_w1_and_factorised_w2() -> None:
    out = check_exact(tiny_unet(), LoKrConfig(r=2, alpha=3, target_modules=UNET, decompose_both=False), unet_name)
    assert kinds(out) == {frozenset({"lokr_w1", "lokr_w2_a", "lokr_w2_b"})}
    assert {t["alpha"].item() for t in out.values()} == {3.0}


def test_lokr_decompose_both_with_tucker_convs() -> None:
    """peft's Tucker core (lokr_t2) is written as the whole w2 it rebuilds: ComfyUI's own
    rebuild is not contiguous and its torch.kron fails (ComfyUI issue 11245). w1 stays
    factorised, so alpha still carries the scale."""
    config = LoKrConfig(r=1, alpha=2, target_modules=UNET, decompose_both=True, use_effective_conv2d=True)
    unet = tiny_unet()
    out = check_exact(unet, config, unet_name)
    layer = dict(unet.named_modules())["down_blocks.0.resnets.0.conv1"]
    assert "default" in layer.lokr_t2  # peft made a core here
    conv = out["down_blocks.0.resnets.0.conv1"]
    assert set(conv) == {"lokr_w1_a", "lokr_w1_b", "lokr_w2", "alpha"} and conv["alpha"].item() == 2.0
    assert conv["lokr_w2"].shape == (8, 8, 3, 3)
    assert frozenset({"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}) in kinds(out)  # linears, 1x1 convs
    assert not any("lokr_t2" in t for t in out.values())


def test_lokr_tucker_convs_with_a_full_w1_fold_the_scale() -> None:
    config = LoKrConfig(r=2, alpha=3, target_modules=CONVS, decompose_both=False, use_effective_conv2d=True)
    out = check_exact(tiny_unet(), config, unet_name)
    conv = out["mid_block.resnets.0.conv1"]
    assert set(conv) == {"lokr_w1", "lokr_w2", "alpha"} and conv["alpha"].item() == 2.0


def test_lokr_full_w1_and_w2_fold_the_scale_and_patterns_pick_per_module() -> None:
    """r = 8 makes both sides full (8 >= half of 8): ComfyUI applies no alpha there, so
    peft's alpha / r is in lokr_w1; rank_pattern gives to_q a factorised w2 (and w1) and
    alpha_pattern conv1 its own alpha."""
    config = LoKrConfig(r=8, alpha=4, target_modules=UNET, decompose_both=True,
                        rank_pattern={"to_q": 1}, alpha_pattern={"to_q": 6, "conv1": 2.5})
    unet = tiny_unet()
    out = check_exact(unet, config, unet_name)
    full = out["down_blocks.0.resnets.0.conv1"]
    assert set(full) == {"lokr_w1", "lokr_w2", "alpha"} and full["alpha"].item() == 8.0
    layer = dict(unet.named_modules())["down_blocks.0.resnets.0.conv1"]
    torch.testing.assert_close(full["lokr_w1"], layer.lokr_w1["default"].detach() * (2.5 / 8))
    q = out["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert set(q) == {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "alpha"} and q["alpha"].item() == 6.0


def test_lokr_factorised_w1_and_full_w2_with_a_decompose_factor() -> None:
    """decompose_factor 8 splits 32 as 8x4, so at r = 2 w1 is factorised and w2 is full:
    ComfyUI then takes the rank from lokr_w1_b, still peft's r."""
    config = LoKrConfig(r=2, alpha=5, target_modules=ATTENTION, decompose_both=True, decompose_factor=8)
    out = check_exact(tiny_unet(), config, unet_name)
    assert frozenset({"lokr_w1_a", "lokr_w1_b", "lokr_w2"}) in kinds(out)


@pytest.mark.parametrize("config", [
    LoHaConfig(r=2, alpha=3, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    LoKrConfig(r=2, alpha=3, decompose_both=True, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc2"],
               rank_pattern={"fc2": 16}),
], ids=["loha", "lokr"])
def test_a_text_encoder(config: LoHaConfig | LoKrConfig) -> None:
    out = check_exact(tiny_text_encoder(), config, te_name)
    assert any(path.endswith("self_attn.q_proj") for path in out)


def small_state() -> tuple[dict[str, torch.Tensor], dict]:
    unet = tiny_unet()
    config = LoHaConfig(r=2, alpha=3, target_modules=["to_q"])
    adapted(unet, config)
    return get_peft_model_state_dict(unet), saved_config(config)


def test_an_odd_key_is_named() -> None:
    state, config = small_state()
    state["mid_block.attentions.0.transformer_blocks.0.attn1.to_q.hada_w3_a"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"not LoHa tensors.*to_q\.hada_w3_a"):
        to_lycoris(state, config, unet_name)
    state.pop("mid_block.attentions.0.transformer_blocks.0.attn1.to_q.hada_w3_a")
    state["conv_in.weight"] = torch.zeros(2, 2)  # a modules_to_save copy
    with pytest.raises(ValueError, match=r"'conv_in\.weight'"):
        to_lycoris(state, config, unet_name)


def test_a_missing_key_is_named() -> None:
    state, config = small_state()
    key = next(k for k in state if k.endswith("hada_w2_b"))
    del state[key]
    with pytest.raises(ValueError, match="lacks " + re.escape(key)):
        to_lycoris(state, config, unet_name)


def test_a_config_that_does_not_fit_the_state_is_refused() -> None:
    state, config = small_state()
    with pytest.raises(ValueError, match=r"hada_w1_b has shape \(2, 32\), not rank 4"):
        to_lycoris(state, {**config, "r": 4}, unet_name)
    with pytest.raises(ValueError, match=r"no 'alpha'"):
        to_lycoris(state, {k: v for k, v in config.items() if k != "alpha"}, unet_name)
    with pytest.raises(ValueError, match=r"peft_type is 'LORA'"):
        to_lycoris(state, {**config, "peft_type": "LORA"}, unet_name)
    with pytest.raises(ValueError, match=r"not LoKr tensors"):
        to_lycoris(state, {**config, "peft_type": "LOKR"}, unet_name)
    with pytest.raises(ValueError, match=r"same LyCORIS name"):
        to_lycoris(state, config, lambda module: "lora_unet_x")
