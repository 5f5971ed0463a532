"""compressed-tensors round trip: save_pretrained(save_compressed=True), load in a fresh
process with load_flatquant_model, same logits."""

import subprocess
import sys
import textwrap

import torch

from flatquant_modifier import FlatQuantModifier
from tests.conftest import load_tiny
from tests.helpers import logits, run, weight_quantizer


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


def test_a_checkpoint_transformers_cannot_load_whole_is_refused(tmp_path):
    """Mixtral's fused experts (transformers 5): llm-compressor saves them one linear
    per expert, which transformers' fused experts cannot load. The load says so instead
    of returning a model with re-initialised experts."""
    import pytest
    from transformers import MixtralConfig, MixtralForCausalLM

    from flatquant_modifier import FlatQuantMapping, load_flatquant_model
    from tests.conftest import byte_tokenizer

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           num_local_experts=4, num_experts_per_tok=2)
    MixtralForCausalLM(config).save_pretrained(tmp_path / "mixtral")
    byte_tokenizer().save_pretrained(tmp_path / "mixtral")
    model, tok = load_tiny(tmp_path / "mixtral")
    attention = [
        FlatQuantMapping(name="qkv", targets=["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$"],
                         smooth_layer="re:.*input_layernorm$"),
        FlatQuantMapping(name="o", targets=["re:.*o_proj$"]),
    ]
    run(model, tok, [FlatQuantModifier(epochs=1, mappings=attention), weight_quantizer()])
    model.save_pretrained(tmp_path / "ct", save_compressed=True)
    with pytest.raises(ValueError, match=r"(?s)missing: model\.layers\.0\.mlp\.experts\.down_proj"
                       r".*unexpected: model\.layers\.0\.mlp\.experts\.0\..*one linear per expert"):
        load_flatquant_model(tmp_path / "ct")
