"""LoKr and LoHa ([method.lora] variant "lokr" / "loha"): peft's adapter folders load onto
diffusers' pipelines (results.AdapterResult) and render as the run trained them, resume to
the same weights, export as one LyCORIS file that merges to peft's own deltas (ComfyUI's
formula from test_lycoris), and every family takes them at config load (a Flux run too)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WORDS, run_config
from diffusers import FluxPipeline
from peft import PeftConfig
from peft.tuners.loha.layer import LoHaLayer
from peft.tuners.lokr.layer import LoKrLayer
from safetensors.torch import load_file
from test_lycoris import lycoris_delta
from test_methods import PROMPT, caption_folder, load_base, pipeline_image, trained_image

from difftune.config import ConfigError, build_config
from difftune.export.lora import export_lora
from difftune.families import get_family
from difftune.results import RESULTS
from difftune.families.flux.tiny import build_tiny_flux
from difftune.training.loop import Run

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]  # linears and 3x3 convs (channels_last)
LAYERS = (LoKrLayer, LoHaLayer)


def adapter_config(base: Path, data: Path, out: Path, variant: str, steps: int = 2) -> dict:
    return run_config(base, data, out, method={
        "kind": "lora", "train_text_encoder": True,
        "lora": {"variant": variant, "rank": 4, "alpha": 8.0, "target_modules": TARGETS}},
        train={"learning_rate": 1e-2, "max_steps": steps, "checkpoint_every": 1}, validation={"every": 100})


@pytest.fixture(scope="module")
def captions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return caption_folder(tmp_path_factory.mktemp("captions") / "folder", 8)


@pytest.fixture(scope="module", params=["lokr", "loha"])
def adapter_run(request: pytest.FixtureRequest, tiny_base: Path, captions: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Run:
    run = Run(build_config(adapter_config(tiny_base, captions, tmp_path_factory.mktemp(request.param) / "run",
                                          request.param)))
    run.fit()
    return run


def adapted_layers(run: Run) -> dict[str, dict[str, torch.nn.Module]]:
    """{part: {module path: peft LoKr/LoHa layer}} of the trained model in memory."""
    return {part: {path: m for path, m in run.accelerator.unwrap_model(module).named_modules()
                   if isinstance(m, LAYERS)}
            for part, module in run.trainee.trained.items()}


def test_the_adapters_load_onto_the_pipeline_and_render_as_trained(adapter_run: Run, tiny_base: Path) -> None:
    variant = adapter_run.config.method.lora.variant
    final = adapter_run.run_dir / "final"
    assert adapter_run.config.method.result == "adapter"
    assert not (final / "pytorch_lora_weights.safetensors").exists()
    for part in ("unet", "text_encoder"):
        config = json.loads((final / part / "adapter_config.json").read_text())
        assert config["peft_type"] == variant.upper() and config["target_modules"] == sorted(config["target_modules"])
        assert PeftConfig.from_peft_type(**config).r == 4
    layers = adapted_layers(adapter_run)
    assert any(m.get_base_layer().weight.ndim == 4 for m in layers["unet"].values())  # convs adapted
    base_image = pipeline_image(load_base(tiny_base))
    pipe = load_base(tiny_base)
    RESULTS["adapter"].attach(get_family("sd"), pipe, final)
    assert sum(isinstance(m, LAYERS) for m in pipe.text_encoder.modules()) == len(layers["text_encoder"])
    image = pipeline_image(pipe)
    assert np.abs(image - base_image).max() > 1e-3  # the adapters change the image
    assert np.abs(trained_image(adapter_run) - image).max() < 1e-5


def test_the_lycoris_export_merges_to_pefts_deltas(adapter_run: Run, tiny_base: Path, tmp_path: Path) -> None:
    out = export_lora(adapter_run.run_dir, tmp_path / "lycoris.safetensors")
    exported = load_file(out)
    pipe = load_base(tiny_base)
    known = {f"lora_unet_{n.replace('.', '_')}" for n, _ in pipe.unet.named_modules()}
    known |= {f"lora_te_text_model_{n.replace('.', '_')}" for n, _ in pipe.text_encoder.named_modules()}
    assert {key.split(".")[0] for key in exported} <= known
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_"}
    checked = 0
    for part, layers in adapted_layers(adapter_run).items():
        for path, layer in layers.items():
            name = prefixes[part] + path.removeprefix("text_model.").replace(".", "_")
            tensors = {key[len(name) + 1:]: t for key, t in exported.items() if key.startswith(name + ".")}
            with torch.no_grad():
                expected = layer.get_delta_weight("default").double()
            got = lycoris_delta(tensors, layer.get_base_layer().weight.shape)
            assert expected.abs().max() > 0, path  # trained: no factor is zero any more
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item(),
                                       msg=lambda m, p=path: f"{p}: {m}")
            checked += len(tensors)
    assert checked == len(exported)
    assert json.loads(load_file_metadata(out)["ss_network_args"])["algo"] == adapter_run.config.method.lora.variant
    with pytest.raises(ValueError, match="no diffusers LoRA file of them: diffusers' load_lora_weights reads no LoKr"):
        export_lora(adapter_run.run_dir, tmp_path / "d.safetensors", format="diffusers")


def load_file_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def test_a_resumed_run_ends_with_the_uninterrupted_runs_weights(adapter_run: Run, tiny_base: Path, captions: Path,
                                                                tmp_path: Path) -> None:
    variant = adapter_run.config.method.lora.variant
    Run(build_config(adapter_config(tiny_base, captions, tmp_path / "run", variant, steps=1))).fit()
    resumed = Run(build_config(adapter_config(tiny_base, captions, tmp_path / "run", variant)))
    assert resumed.resume_from == tmp_path / "run" / "checkpoints" / "step-000001"
    resumed.fit()
    for part in ("unet", "text_encoder"):
        a = load_file(adapter_run.run_dir / "final" / part / "adapter_model.safetensors")
        b = load_file(tmp_path / "run" / "final" / part / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def raw_config(family: str, **method) -> dict:
    return {"model": {"pretrained": "unused", "family": family}, "method": method,
            "data": {"path": ".", "resolution": 64}, "train": {"output_dir": "out", "report_to": "none"}}


def lora_families() -> list[str]:
    from difftune.catalog import families

    return sorted(name for name, facts in families().items() if "lora" in facts.capabilities)


def test_the_families_with_adapters_are_all_checked() -> None:
    assert {"sd", "sdxl", "flux", "cogview4"} <= set(lora_families())


@pytest.mark.parametrize("variant", ["lokr", "loha"])
@pytest.mark.parametrize("family", lora_families())
def test_every_family_takes_the_variants(family: str, variant: str) -> None:
    config = build_config(raw_config(family, kind="lora", lora={"variant": variant, "rank": 8, "alpha": 4.0}))
    assert config.method.result == "adapter" and config.method.lora.variant == variant
    dreambooth = build_config(raw_config(family, kind="dreambooth", dreambooth={"instance_prompt": "a sks dog"},
                                         lora={"variant": variant}))
    assert dreambooth.method.result == "adapter"


def test_what_the_variants_cannot_take_is_named() -> None:
    with pytest.raises(ConfigError, match=r"method\.lora\.variant: Input should be .*'lokr' or 'loha' "
                                          r"\(got 'lokrr'\)"):
        build_config(raw_config("sd", kind="lora", lora={"variant": "lokrr"}))
    with pytest.raises(ConfigError, match=r"method\.lora\.dropout: variant 'lokr' has no input dropout"):
        build_config(raw_config("sd", kind="lora", lora={"variant": "lokr", "dropout": 0.1}))
    with pytest.raises(ConfigError, match=r"method\.lora\.init: .*variant 'loha' starts as peft"):
        build_config(raw_config("sd", kind="lora", lora={"variant": "loha", "init": "kaiming"}))
    for family in ("flux", "cogview4"):  # the control pipelines' load_lora_weights reads LoRA files only
        with pytest.raises(ConfigError, match=r"method\.lora\.variant: kind 'control' with 'loha' adapters .* "
                                              r"use variant 'lora' or 'dora'"):
            build_config(raw_config(family, kind="control", lora={"variant": "loha"}))
        dora = build_config(raw_config(family, kind="control", lora={"variant": "dora"}))
        assert dora.method.result == "control_lora"
    assert build_config(raw_config("sd", kind="lora", lora={"variant": "dora"})).method.result == "lora"


def test_a_flux_lokr_run_loads_onto_fluxpipeline_and_changes_it(circles: Path, tmp_path: Path) -> None:
    base = build_tiny_flux(tmp_path / "base", WORDS, seed=0)
    raw = run_config(base, circles, tmp_path / "run", model={"family": "flux"},
                     method={"kind": "lora", "lora": {"variant": "lokr", "rank": 2}},
                     train={"max_steps": 2, "checkpoint_every": 2, "learning_rate": 1e-2}, validation={"every": 100})
    run = Run(build_config(raw))
    run.fit()
    final = tmp_path / "run" / "final"
    assert [p.name for p in final.iterdir() if p.is_dir()] == ["transformer"]

    def image(pipe: FluxPipeline) -> np.ndarray:
        return pipe(PROMPT, num_inference_steps=2, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]

    pipe = FluxPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    before = image(pipe)
    RESULTS["adapter"].attach(get_family("flux"), pipe, final)
    assert any(isinstance(m, LoKrLayer) for m in pipe.transformer.modules())
    assert not np.allclose(before, image(pipe), atol=1e-4), "the LoKr changed nothing"
    with pytest.raises(ValueError, match="a FLUX.1 LoKr has no kohya names .* Load its final/ with peft"):
        export_lora(tmp_path / "run", tmp_path / "lycoris.safetensors")


def test_nf4_is_named_for_the_variants_that_cannot_train_on_it() -> None:
    """peft's LoKr/LoHa reshape their delta to the frozen weight's shape, which NF4 packs
    (a LoKr step on an NF4 base fails); int8 and fp8 keep it."""
    from difftune.methods.lora.spec import LoraSettings

    assert LoraSettings(variant="lokr").quantize_problem("nf4").startswith("model.quantize: 'nf4' packs")
    assert LoraSettings(variant="loha").quantize_problem("int8") is None
    assert LoraSettings(variant="lora").quantize_problem("nf4") is None
