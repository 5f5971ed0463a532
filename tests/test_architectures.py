"""The architectures Ascend users quantize, dense and MoE, each as a tiny random model
that keeps its real structure: oneshot -> the absorbed transforms leave the unquantized
model unchanged -> compressed-tensors save and reload -> Ascend export, loaded back
through the references of vllm-ascend's methods, computing the fake-quantized model's
logits."""

import json
from pathlib import Path

import pytest
import torch
from compressed_tensors.quantization import disable_quantization
from compressed_tensors.utils import patch_attr
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from flatquant_modifier import FlatQuantModifier
from flatquant_modifier.emulation import layer_output
from tests.conftest import TINY_QWEN3_MOE, byte_tokenizer, load_tiny
from tests.helpers import (
    assert_round_trips,
    description_of_layer0,
    log_messages,
    logits,
    mixed_weight_quantizer,
    run,
    weight_quantizer,
)

@pytest.fixture(autouse=True)
def calibrate_on_the_cpu(monkeypatch):
    """These are the CPU path's tests on any host: llm-compressor would otherwise
    calibrate on an available GPU and move the model there (the GPU placements are
    tests/test_modifier_gpu.py's and tests/test_experts.py's)."""
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)


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
MOE = dict(moe_intermediate_size=32, num_experts_per_tok=2)
MOE_ARCHITECTURES = {
    # q_norm / k_norm; layer 0 dense (mlp_only_layers)
    "qwen3_moe": (Qwen3MoeForCausalLM, Qwen3MoeConfig(**TINY_QWEN3_MOE)),
    # a shared expert with its sigmoid gate beside the routed ones; qkv biases
    "qwen2_moe": (Qwen2MoeForCausalLM, Qwen2MoeConfig(
        **SHAPE, **MOE, num_experts=4, shared_expert_intermediate_size=64)),
    # checkpoint names block_sparse_moe, w1/w3/w2
    "mixtral": (MixtralForCausalLM, MixtralConfig(**SHAPE, num_local_experts=4,
                                                  num_experts_per_tok=2)),
    # MLA (q_a/q_b, kv_a/kv_b), a dense first layer, shared experts, grouped routing
    # with a score-correction bias
    "deepseek_v3": (DeepseekV3ForCausalLM, DeepseekV3Config(
        **{**SHAPE, "num_key_value_heads": 4}, **MOE, n_routed_experts=4,
        n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_group=2, topk_group=1)),
}
ARCHITECTURES.update(MOE_ARCHITECTURES)
MOE_RECIPE = Path(__file__).parents[1] / "recipes" / "flatquant_w4a4_moe.yaml"


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


@pytest.mark.parametrize("name", [n for n in ARCHITECTURES if n not in MOE_ARCHITECTURES])
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

# packed-module mappings the lookup uses: vllm-ascend's own for qwen3_moe and
# deepseek_v3 (modelslim_config.py), else the vLLM model class's
PACKED = {
    "qwen3_moe": {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                  "gate_up_proj": ["gate_proj", "up_proj"],
                  "experts": ["experts.0.gate_proj", "experts.0.up_proj", "experts.0.down_proj"]},
    "qwen2_moe": {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                  "gate_up_proj": ["gate_proj", "up_proj"]},
    "mixtral": {"qkv_proj": ["q_proj", "k_proj", "v_proj"]},
    "deepseek_v3": {"gate_up_proj": ["gate_proj", "up_proj"],
                    "experts": ["experts.0.gate_proj", "experts.0.up_proj", "experts.0.down_proj"],
                    "fused_qkv_a_proj": ["q_a_proj", "kv_a_proj_with_mqa"]},
}


def _vllm_ascend_type(description: dict, prefix: str, packed: dict) -> str:
    """The quant type vllm-ascend's ModelSlim config finds for the vLLM layer
    ``prefix`` (``is_layer_skipped_ascend``, then ``get_linear_quant_type``): a fused
    layer's shards must all be described with one type; a layer with no entry raises
    KeyError there, as it does in vllm-ascend."""
    proj = prefix.split(".")[-1]
    if proj in packed:
        kinds = {description[f"{prefix.replace(proj, shard)}.weight"] for shard in packed[proj]}
        assert len(kinds) == 1, (prefix, kinds)
        return kinds.pop()
    if any(k.startswith(prefix) and k.endswith(".weight") and v == "FLOAT"
           for k, v in description.items()):
        return "FLOAT"
    return description[f"{prefix}.weight"]


# vLLM's layers of each architecture (its names) -> the type they must be served with
VLLM_LAYERS = {
    "qwen3_moe": {"model.layers.0.self_attn.qkv_proj": "W4A4_FLATQUANT_DYNAMIC",
                  "model.layers.0.mlp.gate_up_proj": "W4A4_FLATQUANT_DYNAMIC",
                  "model.layers.0.mlp.down_proj": "W4A4_FLATQUANT_DYNAMIC",
                  "model.layers.1.self_attn.o_proj": "W4A4_FLATQUANT_DYNAMIC",
                  "model.layers.1.mlp.experts": "W8A8_DYNAMIC"},
    "qwen2_moe": {"model.layers.1.self_attn.qkv_proj": "W4A4_FLATQUANT_DYNAMIC",
                  "model.layers.1.self_attn.o_proj": "W4A4_FLATQUANT_DYNAMIC",
                  "model.layers.1.mlp.experts": "W8A8_DYNAMIC",
                  "model.layers.1.mlp.shared_expert.gate_up_proj": "FLOAT",
                  "model.layers.1.mlp.shared_expert.down_proj": "FLOAT"},
    "mixtral": {"model.layers.1.self_attn.qkv_proj": "W4A4_FLATQUANT_DYNAMIC",
                "model.layers.1.self_attn.o_proj": "W4A4_FLATQUANT_DYNAMIC",
                "model.layers.1.block_sparse_moe.experts": "W8A8_DYNAMIC"},
    "deepseek_v3": {"model.layers.1.self_attn.fused_qkv_a_proj": "W4A4_FLATQUANT_DYNAMIC",
                    "model.layers.1.self_attn.q_b_proj": "W4A4_FLATQUANT_DYNAMIC",
                    "model.layers.1.self_attn.kv_b_proj": "FLOAT",
                    "model.layers.1.self_attn.o_proj": "W4A4_FLATQUANT_DYNAMIC",
                    "model.layers.0.mlp.gate_up_proj": "W4A4_FLATQUANT_DYNAMIC",
                    "model.layers.0.mlp.down_proj": "W4A4_FLATQUANT_DYNAMIC",
                    "model.layers.1.mlp.experts": "W8A8_DYNAMIC",
                    "model.layers.1.mlp.shared_experts.gate_up_proj": "W8A8_DYNAMIC",
                    "model.layers.1.mlp.shared_experts.down_proj": "W8A8_DYNAMIC"},
}


@pytest.mark.parametrize("name", MOE_ARCHITECTURES)
def test_moe_recipe_round_trips_and_exports(name, tmp_path):
    """recipes/flatquant_w4a4_moe.yaml: FlatQuant on attention and dense MLPs, routed
    experts W8A8_DYNAMIC (vllm-ascend's MoE method), shared experts as its int8
    shared-expert path needs, routers and DeepSeek's kv_b_proj in full precision;
    written with vLLM's checkpoint names."""
    model, tok = _tiny(name, tmp_path / name)
    run(model, tok, str(MOE_RECIPE))
    assert_round_trips(model, tok, tmp_path)
    description = json.loads((tmp_path / "ascend" / "quant_model_description.json").read_text())
    kinds = {key.removesuffix(".weight"): kind for key, kind in description.items()
             if key.endswith(".weight")}
    block = "block_sparse_moe" if name == "mixtral" else "mlp"
    moe = f"model.layers.1.{block}"
    experts = {k: v for k, v in kinds.items() if k.startswith(f"{moe}.experts.")}
    assert len(experts) == 4 * 3 and set(experts.values()) == {"W8A8_DYNAMIC"}
    assert kinds[f"{moe}.experts"] == "W8A8_DYNAMIC"  # looked up without a packed mapping
    assert kinds[f"{moe}.gate"] == "FLOAT"
    if name == "mixtral":
        assert f"{moe}.experts.0.w1" in kinds and f"{moe}.experts.0.w2" in kinds
    attention = {k.rpartition(".")[2]: v for k, v in kinds.items()
                 if k.startswith("model.layers.1.self_attn.") and "_proj" in k}
    if name == "deepseek_v3":
        assert attention == {"q_a_proj": "W4A4_FLATQUANT_DYNAMIC",
                             "kv_a_proj_with_mqa": "W4A4_FLATQUANT_DYNAMIC",
                             "q_b_proj": "W4A4_FLATQUANT_DYNAMIC",
                             "o_proj": "W4A4_FLATQUANT_DYNAMIC", "kv_b_proj": "FLOAT"}
    else:
        assert set(attention.values()) == {"W4A4_FLATQUANT_DYNAMIC"}
    # beside int8 routed experts vllm-ascend runs shared experts on its int8 path:
    # DeepSeek's W8A8_DYNAMIC, Qwen2-MoE's gated one in full precision
    shared = {k.rpartition(".")[2]: v for k, v in kinds.items() if ".shared_expert" in k}
    if name == "qwen2_moe":
        assert shared == {"gate_proj": "FLOAT", "up_proj": "FLOAT", "down_proj": "FLOAT",
                          "shared_expert_gate": "FLOAT"}
    if name == "deepseek_v3":
        assert set(shared.values()) == {"W8A8_DYNAMIC"} and len(shared) == 3
    if name in ("qwen3_moe", "deepseek_v3"):  # the dense layer 0
        assert kinds["model.layers.0.mlp.down_proj"] == "W4A4_FLATQUANT_DYNAMIC"
    # every vLLM layer is found, with its type, as vllm-ascend looks it up
    layers = {**VLLM_LAYERS[name], "model.embed_tokens": "FLOAT", "lm_head": "FLOAT"}
    found = {prefix: _vllm_ascend_type(description, prefix, PACKED[name]) for prefix in layers}
    assert found == layers


def test_quantized_experts_without_an_int8_quantizer_are_refused_at_calibration_start(tmp_path):
    model, tok = _tiny("qwen3_moe", tmp_path / "moe")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.0\.\w+_proj gets "
                       r"4-bit weights.*routed experts as W8A8_DYNAMIC.*w8a8_dynamic"):
        run(model, tok, [FlatQuantModifier(epochs=1), weight_quantizer()])


def test_flatquant_on_routed_experts_or_kv_b_proj_is_refused(tmp_path):
    from flatquant_modifier import FlatQuantMapping

    model, tok = _tiny("deepseek_v3", tmp_path / "ds")
    experts = FlatQuantMapping(name="experts", targets=["re:.*experts\\.\\d+\\.down_proj$"],
                               optional=True)
    with pytest.raises(ValueError, match="no FlatQuant method for MoE experts"):
        run(model, tok, [FlatQuantModifier(epochs=1, mappings=[experts])])
    kv_b = FlatQuantMapping(name="kv_b", targets=["re:.*kv_b_proj$"])
    with pytest.raises(ValueError, match=r"kv_b_proj must stay in full precision"):
        run(model, tok, [FlatQuantModifier(epochs=1, mappings=[kv_b])])


@pytest.mark.parametrize("name", ["deepseek_v3", "qwen2_moe"])
def test_shared_experts_vllm_ascend_cannot_serve_beside_int8_experts_are_refused(name, tmp_path):
    model, tok = _tiny(name, tmp_path / name)
    routed = "re:.*mlp\\.experts\\.\\d+\\.(gate|up|down)_proj$"
    shared = "re:.*mlp\\.shared_experts?\\.(gate|up|down)_proj$"
    # FlatQuant shared experts (the default mappings): no int8 weights for that path
    with pytest.raises(ValueError, match=r"shared_experts? is W4A4_FLATQUANT_DYNAMIC and "
                       r"beside W8A8_DYNAMIC routed experts .*int8 shared-expert path"):
        run(model, tok, [FlatQuantModifier(epochs=1, w8a8_dynamic=[routed])])
    if name == "qwen2_moe":  # int8, but that path skips Qwen2-MoE's shared-expert gate
        with pytest.raises(ValueError, match="does not apply the shared expert's sigmoid gate"):
            run(model, tok, [FlatQuantModifier(epochs=1, w8a8_dynamic=[routed, shared])])


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_the_compiled_training_forward_trains_as_the_eager_one(name, tmp_path, monkeypatch):
    """``torch_compile=True`` on every architecture, traced without code generation
    ("aot_eager"): no fallback to eager, no graph break in dense layers (MoE blocks
    route tokens through data-dependent shapes on the CPU; on CUDA they run as grouped
    GEMMs), and a training that lowers every layer's loss as the eager one does. The
    trained losses are not compared: AdamW's first updates, ``lr * sign(gradient)``,
    move the parameters whose gradients are rounding noise a whole step, so two
    trainings whose gradients differ in the last bits (the traced backward of Llama 3's
    rotary scaling, MLA or the routers sums in another order, differently on other
    CPUs) end a few percent apart (Qwen2-MoE on an AVX2 CPU: 5.4 %). The step itself is
    compared exactly: :func:`test_the_compiled_step_has_the_eager_loss_and_gradients`."""
    from torch._dynamo.utils import counters

    from flatquant_modifier import emulation

    monkeypatch.setattr(emulation, "COMPILE_BACKEND", "aot_eager")
    reports = []
    try:
        with log_messages() as messages:
            for torch_compile in (False, True):
                model, tok = _tiny(name, tmp_path / f"{name}-{torch_compile}")
                torch._dynamo.reset()
                counters.clear()
                modifier = FlatQuantModifier(epochs=2, learn_weight_clip=False,
                                             torch_compile=torch_compile)
                run(model, tok, [modifier])
                reports.append(modifier.reports)
        graph_breaks = dict(counters["graph_break"])
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    eager, traced = reports
    assert graphs >= 1
    assert not [m for m in messages if "compiled training forward" in str(m)]
    if name not in MOE_ARCHITECTURES:
        assert not graph_breaks, graph_breaks
        # layers of one shape share one graph: no recompilation per layer (Dynamo
        # guarded on compressed-tensors' offload cache, a graph per layer, and past
        # ``recompile_limit`` eager training)
        assert graphs == 1, f"{graphs} graphs for {len(traced)} layers"
    assert len(traced) == len(eager) > 0
    # evaluation passes run eagerly: the first layer's, on the same inputs, are equal
    assert traced[0].loss_rtn == eager[0].loss_rtn
    for compiled, reference in zip(traced, eager):
        assert compiled.loss_final < compiled.loss_init
        assert reference.loss_final < reference.loss_init


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_the_compiled_step_has_the_eager_loss_and_gradients(name):
    """One training step of every architecture's first layer (random transforms),
    compiled (traced with "aot_eager") and eager: the same loss and the same gradient of
    every learnable parameter, up to float32 rounding."""
    from flatquant_modifier import emulation
    from tests.test_emulation import _one_step_gradients, assert_same_step

    cls, config = ARCHITECTURES[name]
    results = []
    for torch_compile in (False, True):
        torch.manual_seed(0)
        model = cls(config)
        with patch_attr(emulation, "COMPILE_BACKEND", "aot_eager"):
            torch._dynamo.reset()
            try:
                results.append(_one_step_gradients("int", torch.device("cpu"),
                                                   torch_compile, model=model))
            finally:
                torch._dynamo.reset()
    eager, compiled = results
    assert_same_step(compiled, eager)


@pytest.mark.parametrize("name", ["mistral", "mixtral", "qwen3_moe", "llama3"])
def test_the_pipeline_calibrates_causal_layers(name, tmp_path):
    """llm-compressor 0.14's traced pipeline calls the decoder layers of models that
    pick their mask function at run time (Mistral, Mixtral, Qwen3-MoE) with eager
    attention and no mask, which attends to later tokens; FlatQuant adds the causal
    mask: the first layer's calibration forward is the model's own causal layer, and
    the mask hooks are gone after finalize."""
    import copy

    model, tok = _tiny(name, tmp_path / name)
    reference = copy.deepcopy(model.model.layers[0])
    first = {}

    def keep_first_call(module, args, kwargs, output):
        first.setdefault("call", (args, dict(kwargs), layer_output(output).detach()))

    layer = model.model.layers[0]
    handle = layer.register_forward_hook(keep_first_call, with_kwargs=True)
    hooks = len(layer._forward_pre_hooks)
    run(model, tok, [FlatQuantModifier(epochs=1, learn_weight_clip=False)])
    handle.remove()
    assert len(layer._forward_pre_hooks) == hooks
    args, kwargs, output = first["call"]
    kwargs["attention_mask"] = None  # SDPA without a mask: causal
    with torch.no_grad(), patch_attr(model.config, "_attn_implementation", "sdpa"):
        expected = layer_output(reference(*args, **kwargs))
    torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-5)
