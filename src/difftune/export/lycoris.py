"""peft's LoHa and LoKr adapters in LyCORIS key names (what ComfyUI, A1111 and LyCORIS read).

A LoHa/LoKr run saves, per trained part, peft's state dict (`<module path>.hada_w1_a`,
`<module path>.lokr_w1`, ...) and the adapter's config (`LoHaConfig/LoKrConfig.to_dict()`).
LyCORIS files name each module by its kohya name and hold the same factors:

    LoHa  <name>.hada_w1_a  .hada_w1_b  .hada_w2_a  .hada_w2_b  [.hada_t1  .hada_t2]  .alpha
    LoKr  <name>.lokr_w1 | .lokr_w1_a .lokr_w1_b
          <name>.lokr_w2 | .lokr_w2_a .lokr_w2_b                                       .alpha

peft and LyCORIS share the factor layouts (peft's LoHa/LoKr were written from LyCORIS'):
a linear's factors are (out, r) and (r, in); a conv without the effective (Tucker) form
flattens its kernel into the input axis, (r, in*kh*kw), and the merged delta is reshaped to
the weight's shape; with it (peft's use_effective_conv2d, never for a 1x1 kernel) the
core is (r, r, kh, kw) and both sides are (r, dim): einsum("ijkl,jr,ip->prkl", t, w_b, w_a).
LoKr's delta is kron(w1, w2) (w1 given two trailing unit axes when w2 is a conv kernel).
So the tensors are copied as they are, but for one: a LoKr's Tucker core (lokr_t2, peft's
use_effective_conv2d) is not written, w2 is written whole (lokr_w2, rebuilt as peft does),
because ComfyUI's LoKr fails on its own Tucker rebuild (torch.kron refuses the
non-contiguous einsum result, ComfyUI logs "ERROR lokr ..." and skips the module; ComfyUI
issue 11245). A LoHa's cores (hada_t1/hada_t2) are written: ComfyUI merges those fine.
Then the scale:

- peft scales every module by alpha / r, with r and alpha per module from the config's
  rank_pattern / alpha_pattern (the first pattern whose regex matches the end of the
  module path, as peft's get_pattern_key picks it), else the config's r and alpha.
- ComfyUI scales a LoHa by alpha / hada_w1_b.shape[0], and hada_w1_b is (r, ...) in peft:
  writing peft's alpha gives peft's scale.
- ComfyUI (and LyCORIS, A1111) scale a LoKr by alpha / (the rank of its factorised part,
  lokr_w2_b.shape[0] or lokr_w1_b.shape[0], both r in peft) when it has one, and by 1 when
  both w1 and w2 are full matrices (peft does that when r >= half the larger side of w2,
  and w2 is full here after a Tucker rebuild).
  With a factorised part, peft's alpha is written. With none, no alpha can carry peft's
  scale, so alpha / r is folded into lokr_w1 and alpha is written as r, LyCORIS' own value
  for a full-matrix module ("scale 1"): every reader ignores it there, and LyCORIS' loader
  (lycoris.utils.get_module/make_module) needs the key present.

The merged delta is then exactly peft's get_delta_weight (tests/test_lycoris.py checks it
against ComfyUI's formula, written in the test independently).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

LOHA_TENSORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_TENSORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_KINDS = {"LOHA": ("LoHa", LOHA_TENSORS), "LOKR": ("LoKr", LOKR_TENSORS)}


def to_lycoris(state: Mapping[str, torch.Tensor], config: Mapping[str, Any],
               module_name: Callable[[str], str]) -> dict[str, torch.Tensor]:
    """One trained part's peft LoHa or LoKr state (`get_peft_model_state_dict` of the part)
    in LyCORIS names, `module_name(module path)` naming each module (e.g.
    `lambda m: "lora_unet_" + m.replace(".", "_")`). `config` is the adapter's
    `config.to_dict()` (JSON round-trips are fine): it needs `r` and `alpha`, and
    `rank_pattern` / `alpha_pattern` where the run used them; its `peft_type` (LOHA / LOKR),
    when given, must agree with the keys. A key that is not a LoHa/LoKr tensor, a module
    missing one of its tensors, or a factor whose rank is not the config's r for that module
    is an error naming the key or module."""
    kind = _kind(state, config)
    label, names = _KINDS[kind]
    modules = _modules(state, names, label)
    r, alpha = _number(config, "r"), _number(config, "alpha")
    rank_pattern, alpha_pattern = _pattern(config, "rank_pattern"), _pattern(config, "alpha_pattern")
    out: dict[str, torch.Tensor] = {}
    named: dict[str, str] = {}
    for module, tensors in modules.items():
        name = module_name(module)
        if name in named:
            raise ValueError(f"modules {named[name]!r} and {module!r} have the same LyCORIS name {name!r}")
        named[name] = module
        module_r = _pick(rank_pattern, module, r, "rank_pattern")
        module_alpha = _pick(alpha_pattern, module, alpha, "alpha_pattern")
        convert = _loha if kind == "LOHA" else _lokr
        for suffix, tensor in convert(module, tensors, module_r, module_alpha).items():
            out[f"{name}.{suffix}"] = tensor
    return out


def _kind(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> str:
    if not state:
        raise ValueError("the adapter state is empty: no LoHa or LoKr tensors to convert")
    given = config.get("peft_type")
    given = getattr(given, "value", given)  # peft's PeftType (a str enum) before a JSON round-trip
    if given is not None:
        if not isinstance(given, str) or given.upper() not in _KINDS:
            raise ValueError(f"the adapter config's peft_type is {given!r}: LyCORIS names are written for "
                             "peft's LOHA and LOKR adapters")
        return given.upper()
    suffixes = {key.rsplit(".", 1)[-1] for key in state}
    found = [kind for kind, (_, names) in _KINDS.items() if suffixes & set(names)]
    if len(found) != 1:
        raise ValueError("the adapter config has no peft_type and the keys are "
                         + ("both LoHa and LoKr tensors" if found else "neither LoHa nor LoKr tensors")
                         + f" (e.g. {next(iter(state))!r})")
    return found[0]


def _modules(state: Mapping[str, torch.Tensor], names: tuple[str, ...],
             label: str) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {tensor name: tensor}}, or an error naming the keys that are not the
    adapter's tensors."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    odd = []
    for key, tensor in state.items():
        module, _, suffix = key.rpartition(".")
        if not module or suffix not in names or not isinstance(tensor, torch.Tensor):
            odd.append(key)
            continue
        modules.setdefault(module, {})[suffix] = tensor
    if odd:
        shown = ", ".join(repr(k) for k in odd[:5]) + (f" and {len(odd) - 5} more" if len(odd) > 5 else "")
        raise ValueError(f"{len(odd)} key(s) are not {label} tensors of a module "
                         f"(<module path>.{{{', '.join(names)}}}): {shown}")
    return modules


def _number(config: Mapping[str, Any], key: str) -> float:
    if key not in config:
        raise ValueError(f"the adapter config has no {key!r}: its per-module scale alpha / r needs both")
    return _checked(config[key], f"the adapter config's {key!r}")


def _checked(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} is {value!r}, not a number")
    return float(value)


def _pattern(config: Mapping[str, Any], key: str) -> dict[str, Any]:
    pattern = config.get(key) or {}
    if not isinstance(pattern, Mapping):
        raise ValueError(f"the adapter config's {key!r} is {pattern!r}, not an object of module patterns")
    return dict(pattern)


def _pick(pattern: dict[str, Any], module: str, default: float, what: str) -> float:
    """peft's choice (get_pattern_key): the first pattern, in order, that matches the end
    of the module path at a dot boundary as a regex; else the config's value."""
    for key, value in pattern.items():
        try:
            matched = re.match(rf"(.*\.)?({key})$", module)
        except re.error as error:
            raise ValueError(f"the adapter config's {what} key {key!r} is not a regular expression: {error}") from None
        if matched:
            return _checked(value, f"the adapter config's {what} {key!r}")
    return default


def _need(module: str, tensors: dict[str, torch.Tensor], label: str, *names: str) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"{label} module {module!r} lacks {', '.join(f'{module}.{n}' for n in missing)} "
                         f"(it has {', '.join(sorted(tensors))})")


def _rank(module: str, key: str, tensor: torch.Tensor, r: float) -> None:
    if tensor.ndim < 2 or tensor.shape[0] != r:
        raise ValueError(f"{module}.{key} has shape {tuple(tensor.shape)}, not rank {r:g} first, the r the adapter "
                         f"config gives {module!r}: the config is not the one this state was trained with")


def _out(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous()


def _loha(module: str, tensors: dict[str, torch.Tensor], r: float, alpha: float) -> dict[str, torch.Tensor]:
    _need(module, tensors, "LoHa", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    if ("hada_t1" in tensors) != ("hada_t2" in tensors):
        _need(module, tensors, "LoHa", "hada_t1", "hada_t2")
    # ComfyUI: alpha / hada_w1_b.shape[0]; peft: alpha / r
    _rank(module, "hada_w1_b", tensors["hada_w1_b"], r)
    _rank(module, "hada_w2_b", tensors["hada_w2_b"], r)
    out = {key: _out(tensor) for key, tensor in tensors.items()}
    out["alpha"] = torch.tensor(alpha)
    return out


def _lokr(module: str, tensors: dict[str, torch.Tensor], r: float, alpha: float) -> dict[str, torch.Tensor]:
    for side in ("w1", "w2"):
        full, a, b = f"lokr_{side}", f"lokr_{side}_a", f"lokr_{side}_b"
        if full in tensors and (a in tensors or b in tensors):
            raise ValueError(f"LoKr module {module!r} has both {module}.{full} and its factors {a}/{b}")
        if full not in tensors:
            _need(module, tensors, "LoKr", a, b)
            _rank(module, b, tensors[b], r)
    if "lokr_t2" in tensors and "lokr_w2" in tensors:
        raise ValueError(f"LoKr module {module!r} has {module}.lokr_t2 with a full lokr_w2 (a core needs w2_a/w2_b)")
    out = {key: _out(tensor) for key, tensor in tensors.items()}
    if "lokr_t2" in out:
        # ComfyUI rebuilds w2 from a Tucker core with an einsum whose result is not contiguous,
        # and torch.kron refuses that (pytorch issue 54135): it logs an error and leaves the
        # module out (ComfyUI issue 11245). So w2 is written whole, rebuilt as peft does.
        t2, w2_a, w2_b = out.pop("lokr_t2"), out.pop("lokr_w2_a"), out.pop("lokr_w2_b")
        w2 = torch.einsum("ijkl,jr,ip->prkl", t2.to(torch.float64), w2_b.to(torch.float64), w2_a.to(torch.float64))
        out["lokr_w2"] = w2.to(t2.dtype).contiguous()
    if "lokr_w1" in out and "lokr_w2" in out:
        # ComfyUI applies no alpha without a factorised part: peft's scale goes into w1, and
        # alpha is r, LyCORIS' value for such a module (scale 1)
        w1 = out["lokr_w1"]
        out["lokr_w1"] = (w1.to(torch.float64) * (alpha / r)).to(w1.dtype).contiguous()
        out["alpha"] = torch.tensor(r)
    else:
        out["alpha"] = torch.tensor(alpha)
    return out
