"""The dense architectures Ascend users quantize, each as a tiny random model that keeps
its real structure: oneshot -> the absorbed transforms leave the unquantized model
unchanged -> compressed-tensors save and reload -> Ascend export, loaded back through
the references of vllm-ascend's methods, computing the fake-quantized model's logits."""

import pytest
import torch
from compressed_tensors.quantization import disable_quantization
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from flatquant_modifier import FlatQuantModifier
from tests.conftest import byte_tokenizer, load_tiny
from tests.helpers import (
    assert_round_trips,
    description_of_layer0,
    logits,
    mixed_weight_quantizer,
    run,
    weight_quantizer,
)

SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             tie_word_embeddings=False)
ARCHITECTURES = {
    # Llama 3: GQA, llama3 RoPE scaling
    "llama3": (LlamaForCausalLM, LlamaConfig(**SHAPE, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    # Qwen2 / Qwen2.5: biases on q/k/v (o_proj's smoothing folds into v_proj's bias too)
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**SHAPE)),
    # Qwen3: q_norm / k_norm on the heads, explicit head_dim
    "qwen3": (Qwen3ForCausalLM, Qwen3Config(**SHAPE, head_dim=16)),
    "mistral": (MistralForCausalLM, MistralConfig(**SHAPE, sliding_window=None)),
}


def _tiny(name, path):
    cls, config = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = cls(config)
    with torch.no_grad():  # outlier channels, as real LLMs have
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm") and module.weight.ndim == 1 \
                    and module.weight.numel() == SHAPE["hidden_size"]:
                module.weight[:4] *= 8
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return load_tiny(path)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_transforms_leave_the_unquantized_model_unchanged(name, tmp_path):
    model, tok = _tiny(name, tmp_path / name)
    if name == "qwen2":
        assert model.model.layers[0].self_attn.v_proj.bias is not None
    reference = logits(model)
    run(model, tok, [FlatQuantModifier(epochs=1, learn_weight_clip=False)])
    model.apply(disable_quantization)
    error = ((logits(model) - reference).norm() / reference.norm()).item()
    assert error < 1e-4, error


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_w4a4_round_trips_and_exports(name, tmp_path):
    model, tok = _tiny(name, tmp_path / name)
    run(model, tok, [FlatQuantModifier(epochs=1), weight_quantizer()])
    assert_round_trips(model, tok, tmp_path)
    assert set(description_of_layer0(tmp_path / "ascend").values()) == {"W4A4_FLATQUANT_DYNAMIC"}


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_mixed_precision_round_trips_and_exports(name, tmp_path):
    model, tok = _tiny(name, tmp_path / name)
    int8 = ["re:.*self_attn\\.o_proj$", "re:.*mlp\\.down_proj$"]
    run(model, tok, [FlatQuantModifier(epochs=1, w8a8_dynamic=int8),
                     mixed_weight_quantizer(["o_proj", "down_proj"])])
    assert_round_trips(model, tok, tmp_path)
    kinds = description_of_layer0(tmp_path / "ascend")
    assert {k for k, v in kinds.items() if v == "W8A8_DYNAMIC"} == {"o_proj", "down_proj"}
