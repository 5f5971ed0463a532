"""
Regression pins: every recipe in recipes/, on a fixed tiny random model with a fixed
seed (the Llama, or the Qwen3-MoE of the MoE recipes), must reproduce pinned figures (per-layer loss after training, perplexity on a
short text, the dtypes and shapes of the saved tensors of one layer). A change in
behaviour fails here with the figure that moved.

To re-pin on purpose (a deliberate change of the algorithm or its defaults), run
    FLATQUANT_REPIN=1 python -m pytest -q tests/recipes/test_regression.py
review the diff of tests/recipes/pins/recipes.json, and commit it with the reason.

The figures are computed on a float64 copy of the model (FlatQuant then trains in
float64) in a subprocess with machine-independent CPU kernels (scalar ATen kernels,
MKL's conditional-numerical-reproducibility mode, oneDNN limited to SSE4.1, one
thread). In float32 a 4-bit (or FP4 / FP8-scaled) model flips roundings on last-bit
differences and the flips compound over the training steps and the layers: the
float32 figures depended on the CPU even with those kernels (flatquant_nvfp4's
second-layer loss: 0.00193 on the machine the pins were first taken on, 0.00173 on
an Intel Xeon with AVX-512 on 2026-11-26; with other kernels on one machine, from
0.00139 to 0.00209). In float64 the W4A4 recipes' layer losses are identical to all
printed digits with scalar, two-thread and AVX-512 kernels; flatquant_nvfp4's still
moved 8 % between scalar and AVX-512 kernels (2026-11-26), hence the kernels.
The saved tensors are cast back to float32 first, so their layout is that of a
float32 model.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from llmcompressor.core import active_session
from llmcompressor.modeling.moe.linearize import linearize_moe
from safetensors import safe_open

from flatquant_modifier import FlatQuantModifier

from tests.conftest import byte_tokenizer, load_tiny, save_tiny_model_for
from tests.helpers import run
from tests.recipes.test_recipes import RECIPES

PINS = Path(__file__).parent / "pins" / "recipes.json"
REPIN = os.environ.get("FLATQUANT_REPIN") == "1"
TEXT = (
    "The quick brown fox jumps over the lazy dog. Quantization maps real numbers "
    "to a small set of levels; a learned Kronecker transform flattens the "
    "distribution of activations and weights before they are rounded. "
) * 3
LOSS_RTOL = 0.05
PPL_RTOL = 0.02
ROOT = Path(__file__).resolve().parents[2]
# set before torch is imported, hence a subprocess
REPRODUCIBLE_KERNELS = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def _figures(recipe: Path, model_dir: Path, tmp_path: Path) -> dict:
    spec = yaml.safe_load(recipe.read_text())
    spec["quant_stage"]["quant_modifiers"]["FlatQuantModifier"]["epochs"] = 2
    small = tmp_path / recipe.name
    small.write_text(yaml.safe_dump(spec))
    model, tok = load_tiny(model_dir)
    # oneshot would unpack fused MoE experts into linears of the config's dtype
    linearize_moe(model)
    model.to(torch.float64)
    run(model, tok, str(small), num_samples=16)
    flatquant = next(
        m for m in active_session().lifecycle.recipe.modifiers
        if isinstance(m, FlatQuantModifier)
    )
    ids = byte_tokenizer()(TEXT, return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    _float64_to_float32(model)
    model.save_pretrained(tmp_path / "saved", save_compressed=True)
    tensors = {}
    with safe_open(next((tmp_path / "saved").glob("*.safetensors")), "pt") as reader:
        for key in reader.keys():
            if key.startswith("model.layers.0.self_attn.q_proj."):
                t = reader.get_tensor(key)
                tensors[key] = [str(t.dtype), list(t.shape)]
    return {
        "layer_loss_final": [r.loss_final for r in flatquant.reports],
        "ppl_short_text": math.exp(loss),
        "q_proj_tensors": tensors,
    }


@torch.no_grad()
def _float64_to_float32(model):
    """Cast float64 parameters and buffers to float32 (FP8 scales stay FP8)."""
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for name, tensor in tensors.items():
                if tensor is not None and tensor.dtype == torch.float64:
                    tensor.data = tensor.data.float()


def _figures_with_reproducible_kernels(recipe: Path, tmp_path: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, str(recipe), str(tmp_path)],
        cwd=ROOT, env={**os.environ, **REPRODUCIBLE_KERNELS, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_matches_its_pins(recipe, tmp_path):
    figures = _figures_with_reproducible_kernels(recipe, tmp_path)
    pins = json.loads(PINS.read_text()) if PINS.exists() else {}
    if REPIN:
        pins[recipe.stem] = figures
        PINS.write_text(json.dumps(pins, indent=2, sort_keys=True) + "\n")
        pytest.skip(f"re-pinned {recipe.stem}")
    assert recipe.stem in pins, f"no pins for {recipe.stem}: run with FLATQUANT_REPIN=1"
    pinned = pins[recipe.stem]
    assert figures["q_proj_tensors"] == pinned["q_proj_tensors"], "saved tensors changed"
    assert figures["layer_loss_final"] == pytest.approx(
        pinned["layer_loss_final"], rel=LOSS_RTOL
    ), "per-layer training loss moved"
    assert figures["ppl_short_text"] == pytest.approx(
        pinned["ppl_short_text"], rel=PPL_RTOL
    ), "perplexity on the short text moved"


if __name__ == "__main__":  # the subprocess: build the tiny model, run the recipe
    recipe_path, work = Path(sys.argv[1]), Path(sys.argv[2])
    model_dir = save_tiny_model_for(recipe_path, work / "tiny-model")
    print(json.dumps(_figures(recipe_path, model_dir, work)))
