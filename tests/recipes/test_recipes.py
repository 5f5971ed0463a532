"""Every recipe in recipes/ runs through oneshot on the tiny model it is made for (a
Llama, a Qwen3-MoE) and gives the quantization it promises."""

from pathlib import Path

import pytest
import torch
import yaml

from flatquant_modifier.transform import get_flatquant_transform
from tests.conftest import load_tiny, save_tiny_model_for
from tests.helpers import logits, run

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_runs_on_its_tiny_model(recipe, tmp_path):
    spec = yaml.safe_load(recipe.read_text())
    spec["quant_stage"]["quant_modifiers"]["FlatQuantModifier"]["epochs"] = 1
    small = tmp_path / recipe.name
    small.write_text(yaml.safe_dump(spec))
    model, tok = load_tiny(save_tiny_model_for(recipe, tmp_path / "model"))
    reference = logits(model)
    run(model, tok, str(small))
    out = logits(model)
    assert torch.isfinite(out).all()
    rel = ((out - reference).norm() / reference.norm()).item()
    assert 0 < rel < 0.5, rel  # quantized, and still the same model
    q_proj = model.model.layers[0].self_attn.q_proj
    transform = get_flatquant_transform(q_proj)
    weights = q_proj.quantization_scheme.weights
    if "nvfp4" in recipe.stem:
        assert not transform.quantize and weights.type == "float" and weights.num_bits == 4
        assert q_proj.weight_global_scale.item() == model.model.layers[0].self_attn.v_proj.weight_global_scale.item()
    elif "mxfp4" in recipe.stem:
        assert transform.activations == "mxfp4" and weights.type == "float"
        assert weights.group_size == 32 and weights.scale_dtype == torch.uint8
        assert get_flatquant_transform(model.model.layers[0].self_attn.o_proj).left_blocks == 4
    else:
        assert transform.quantize and weights.type == "int" and weights.strategy == "channel"
