"""compressed-tensors round trip: save_pretrained(save_compressed=True), load in a fresh
process with load_flatquant_model, same logits."""

import subprocess
import sys
import textwrap

import torch

from flatquant_modifier import FlatQuantModifier
from tests.conftest import load_tiny
from tests.helpers import logits, mixed_weight_quantizer, run, weight_quantizer


def test_compressed_checkpoint_loads_back_with_the_same_logits(tiny_llama_dir, tmp_path):
    model, tok = load_tiny(tiny_llama_dir)
    run(model, tok, [FlatQuantModifier(epochs=2), weight_quantizer()])
    torch.save(logits(model), tmp_path / "reference.pt")
    model.save_pretrained(tmp_path / "ct", save_compressed=True)
    code = textwrap.dedent(f"""
        import torch
        from flatquant_modifier import load_flatquant_model
        from tests.helpers import logits
        model = load_flatquant_model({str(tmp_path / "ct")!r})
        reference = torch.load({str(tmp_path / "reference.pt")!r})
        print("MAXDIFF", (logits(model) - reference).abs().max().item())
    """)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=str(_root())
    )
    assert result.returncode == 0, result.stderr[-3000:]
    diff = float(result.stdout.split("MAXDIFF")[-1])
    assert diff < 1e-5, diff


def _root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


def _saved(tiny_llama_dir, tmp_path):
    model, tok = load_tiny(tiny_llama_dir)
    run(model, tok, [FlatQuantModifier(epochs=1), weight_quantizer()])
    model.save_pretrained(tmp_path / "ct", save_compressed=True)
    tok.save_pretrained(tmp_path / "ct")
    return tmp_path / "ct"


def test_truncated_missing_and_unexpected_weights_are_named(tiny_llama_dir, tmp_path):
    import shutil

    import pytest
    from safetensors.torch import load_file, save_file

    from flatquant_modifier import load_flatquant_model

    saved = _saved(tiny_llama_dir, tmp_path)
    file = saved / "model.safetensors"
    tensors = load_file(file)
    # a weight the model needs is missing, another one is foreign
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    edited = dict(tensors)
    del edited["model.norm.weight"]
    edited["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(edited, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 missing: model\.norm\.weight; 1 unexpected: "
                       r"model\.layers\.0\.mlp\.extra\.weight.*re-initialised"):
        load_flatquant_model(broken)
    # a truncated file is named
    data = file.read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"broken/model\.safetensors: not a readable "
                       r"safetensors file.*truncated or corrupt"):
        load_flatquant_model(broken)


def test_per_expert_moe_checkpoints_load_into_per_expert_modules(tmp_path):
    """Mixtral's experts are fused in transformers 5; llm-compressor calibrates and
    saves them one linear per expert. They load back into per-expert modules (the keys
    as saved), and transformers' fused loading is left as it was."""
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
    from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    from flatquant_modifier import load_flatquant_model
    from tests.conftest import byte_tokenizer

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           num_local_experts=4, num_experts_per_tok=2)
    MixtralForCausalLM(config).save_pretrained(tmp_path / "mixtral")
    byte_tokenizer().save_pretrained(tmp_path / "mixtral")
    mapping = repr(get_checkpoint_conversion_mapping("mixtral"))
    model, tok = load_tiny(tmp_path / "mixtral")
    run(model, tok, [FlatQuantModifier(epochs=1, w8a8_dynamic=["re:.*experts.*"]),
                     mixed_weight_quantizer(["gate_proj", "up_proj", "down_proj"])])
    model.save_pretrained(tmp_path / "ct", save_compressed=True)
    loaded = load_flatquant_model(tmp_path / "ct")
    experts = loaded.model.layers[1].mlp.experts
    assert isinstance(experts, LinearExperts2D)
    assert experts[3].down_proj.quantization_scheme.weights.num_bits == 8
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=0)
    assert repr(get_checkpoint_conversion_mapping("mixtral")) == mapping
    fused = AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral")
    assert not isinstance(fused.model.layers[1].mlp.experts, LinearExperts2D)
