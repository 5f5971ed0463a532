"""FlatQuantModifier through llm-compressor's oneshot on a tiny random Llama."""

import math
from pathlib import Path

import pytest
import torch
import yaml
from compressed_tensors import TRANSFORM_CONFIG_NAME
from compressed_tensors.quantization import disable_quantization, enable_quantization
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier

from flatquant_modifier import FlatQuantModifier
from flatquant_modifier.kronecker import kronecker_matmul
from flatquant_modifier.quantize import fake_quantize_activation
from flatquant_modifier.transform import get_flatquant_transform
from tests.conftest import load_tiny, random_token_dataset, save_tiny_model_for
from tests.helpers import WEIGHTS_W4, log_messages, logits, run, weight_quantizer

def test_transforms_preserve_the_unquantized_model(tiny_llama_dir):
    model, tok = load_tiny(tiny_llama_dir)
    reference = logits(model)
    # weight clipping changes the weights on purpose; everything else is exact
    modifier = FlatQuantModifier(epochs=2, learn_weight_clip=False, transform_init="random")
    run(model, tok, [modifier])
    q_proj = model.model.layers[0].self_attn.q_proj
    transform = get_flatquant_transform(q_proj)
    assert transform is not None
    assert not torch.allclose(transform.left_trans, torch.eye(8))  # really transformed
    model.apply(disable_quantization)
    out = logits(model)
    model.apply(enable_quantization)
    rel = ((out - reference).norm() / reference.norm()).item()
    assert rel < 1e-4, rel


def test_float64_model_trains_and_transforms_in_float64(tiny_llama_dir):
    model, tok = load_tiny(tiny_llama_dir)
    model.to(torch.float64)
    reference = logits(model)
    modifier = FlatQuantModifier(epochs=1, learn_weight_clip=False)
    run(model, tok, [modifier])
    transform = get_flatquant_transform(model.model.layers[1].mlp.down_proj)
    assert transform.left_trans.dtype == torch.float64
    assert all(r.loss_final < r.loss_rtn for r in modifier.reports)
    model.apply(disable_quantization)
    out = logits(model)
    # the absorbed transforms are exact to float64 rounding (float32 models: 1e-4)
    rel = ((out - reference).norm() / reference.norm()).item()
    assert rel < 1e-10, rel


@pytest.mark.parametrize("parametrization", ["orthogonal", "dense"])
@pytest.mark.parametrize("init", ["identity", "random"])
def test_training_beats_identity_transforms_in_every_layer(tiny_llama_dir, parametrization, init):
    model, tok = load_tiny(tiny_llama_dir)
    modifier = FlatQuantModifier(epochs=8, parametrization=parametrization, transform_init=init)
    run(model, tok, [modifier], num_samples=16)
    assert [r.name for r in modifier.reports] == ["model.layers.0", "model.layers.1"]
    for report in modifier.reports:
        # loss_rtn: identity transforms, no smoothing, no clipping
        assert report.loss_final < report.loss_rtn, report
        if init == "random":  # the default init: a clear margin
            assert report.loss_final < 0.75 * report.loss_rtn, report
        assert len(report.epoch_losses) == 8


@pytest.mark.parametrize("propagate", [True, False])
def test_w4a4_forward_is_transform_then_npu_quant_then_int4_weights(tiny_llama_dir, propagate):
    model, tok = load_tiny(tiny_llama_dir)
    modifier = FlatQuantModifier(epochs=2, propagate_activation_quant=propagate)
    run(model, tok, [modifier, weight_quantizer()])
    down = model.model.layers[1].mlp.down_proj
    transform = get_flatquant_transform(down)
    clip = transform.clip_ratio.item()
    assert 0.0 < clip <= 1.0 and transform.left_trans.shape == (8, 8)
    assert transform.right_trans.shape == (16, 16)
    # by hand: P1^T X P2, per-token int4 with max|y| * clip / 7, then int4 weights
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))
    y = kronecker_matmul(x, transform.left_trans, transform.right_trans)
    y = fake_quantize_activation(y, clip, 4)
    scale = down.weight_scale  # [out, 1], written by the QuantizationModifier
    w_int = torch.clamp(torch.round(down.weight / scale), -8, 7)
    expected = y @ (w_int * scale).T
    with torch.no_grad():
        torch.testing.assert_close(down(x), expected, rtol=1e-5, atol=1e-5)
    # the transform config that save_pretrained writes covers every transformed linear
    config = getattr(model, TRANSFORM_CONFIG_NAME)
    targets = config.config_groups["flatquant"].apply[0].targets
    assert len(targets) == 2 * 7 and "model.layers.1.mlp.down_proj" in targets


def test_yaml_recipe_and_python_composition_agree(tiny_llama_dir, tmp_path):
    recipe = {
        "quant_stage": {
            "quant_modifiers": {
                "FlatQuantModifier": {"epochs": 2, "ignore": ["lm_head"]},
                "QuantizationModifier": {
                    "ignore": ["lm_head"],
                    "config_groups": {"group_0": {"targets": ["Linear"], "weights": WEIGHTS_W4}},
                },
            }
        }
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    model_yaml, tok = load_tiny(tiny_llama_dir)
    run(model_yaml, tok, str(path))
    model_py, _ = load_tiny(tiny_llama_dir)
    run(model_py, tok, [FlatQuantModifier(epochs=2), weight_quantizer()])
    state_yaml, state_py = model_yaml.state_dict(), model_py.state_dict()
    assert state_yaml.keys() == state_py.keys()
    for key in state_yaml:
        torch.testing.assert_close(state_yaml[key], state_py[key], msg=key)
    torch.testing.assert_close(logits(model_yaml), logits(model_py))


def test_quantizing_activations_twice_is_refused(tiny_llama_dir):
    model, tok = load_tiny(tiny_llama_dir)
    w4a4 = QuantizationModifier(targets=["Linear"], scheme="W4A16", ignore=["lm_head"])
    w4a4 = QuantizationModifier(
        ignore=["lm_head"],
        config_groups={
            "group_0": {
                "targets": ["Linear"],
                "weights": WEIGHTS_W4,
                "input_activations": {"num_bits": 4, "type": "int", "symmetric": True,
                                      "strategy": "token", "dynamic": True},
            }
        },
    )
    with pytest.raises(ValueError, match="q_proj.*quantizes its input activations.*weights-only"):
        run(model, tok, [FlatQuantModifier(epochs=1), w4a4])


def test_no_calibration_data_is_a_clear_error(tiny_llama_dir):
    model, tok = load_tiny(tiny_llama_dir)
    with pytest.raises(ValueError, match="no dataset was passed"):
        oneshot(model=model, processor=tok, recipe=[FlatQuantModifier()])


def test_nan_loss_stops_with_layer_and_epoch_and_leaves_layer_unchanged(tiny_llama_dir):
    model, tok = load_tiny(tiny_llama_dir)
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(RuntimeError, match=r"layer model.layers.0 became nan in epoch 1/2.*unchanged"):
        run(model, tok, [FlatQuantModifier(epochs=2, lr=math.inf)])
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight, before)
    assert get_flatquant_transform(model.model.layers[0].self_attn.q_proj) is None

    model, tok = load_tiny(tiny_llama_dir)
    modifier = FlatQuantModifier(epochs=1, lr=math.inf, on_nonfinite="skip")
    run(model, tok, [modifier])
    assert modifier.reports == []
    assert get_flatquant_transform(model.model.layers[1].mlp.down_proj) is None


def test_oneshot_batch_size_does_not_change_the_steps(tiny_llama_dir):
    # 8 samples in oneshot batches of 1, 2 or 3 (the last one short): FlatQuant splits
    # the calls into samples, so its steps of 4 samples, and the training, are the same
    runs = {}
    for oneshot_batch in (1, 2, 3):
        model, tok = load_tiny(tiny_llama_dir)
        modifier = FlatQuantModifier(epochs=1, batch_size=4)
        run(model, tok, [modifier], batch_size=oneshot_batch)
        runs[oneshot_batch] = modifier
    step_of_call, num_steps = runs[1]._step_plan
    assert num_steps == 2 and sorted(step_of_call) == [0, 0, 0, 0, 1, 1, 1, 1]
    for oneshot_batch in (2, 3):
        assert runs[oneshot_batch]._step_plan == runs[1]._step_plan
        for ours, plain in zip(runs[oneshot_batch].reports, runs[1].reports):
            assert ours.loss_final == pytest.approx(plain.loss_final, rel=1e-5)


@pytest.mark.parametrize("kind", ["layer", "model"])
def test_target_outputs_are_the_full_precision_models_with_model(tiny_llama_dir, monkeypatch,
                                                                 kind):
    import flatquant_modifier.calibrate as calibrate

    seen = {}
    train_layer = calibrate.train_layer

    def spy(name, layer, groups, params, steps, targets, *args, **kwargs):
        seen[name] = torch.cat([t.reshape(-1, t.shape[-1]) for s in targets for t in s])
        return train_layer(name, layer, groups, params, steps, targets, *args, **kwargs)

    monkeypatch.setattr(calibrate, "train_layer", spy)
    model, tok = load_tiny(tiny_llama_dir)
    reference, _ = load_tiny(tiny_llama_dir)  # the full-precision model's layer outputs
    outputs, hidden = {}, reference.config.hidden_size
    for i, layer in enumerate(reference.model.layers):
        layer.register_forward_hook(
            lambda m, a, out, i=i: outputs.setdefault(f"model.layers.{i}", []).append(
                (out[0] if isinstance(out, tuple) else out).reshape(-1, hidden)))
    with torch.no_grad():
        reference(torch.tensor(random_token_dataset(8, 32)["input_ids"]))
    run(model, tok, [FlatQuantModifier(epochs=1, target_outputs=kind)])

    def sorted_rows(rows):  # the steps order samples by content: compare as sets
        return rows[torch.argsort(rows[:, 0])]

    expected = {name: sorted_rows(torch.cat(out)) for name, out in outputs.items()}
    got = {name: sorted_rows(rows) for name, rows in seen.items()}
    # the first layer's inputs are the embeddings either way
    torch.testing.assert_close(got["model.layers.0"], expected["model.layers.0"])
    error = (got["model.layers.1"] - expected["model.layers.1"]).abs().max()
    scale = expected["model.layers.1"].abs().max()
    if kind == "model":  # the second, the full-precision model's hidden states
        assert error <= 1e-5 * scale
    else:  # the full-precision layer on the quantized first layer's outputs
        assert error > 1e-2 * scale


def test_model_targets_stop_with_a_warning_after_an_untrained_layer(tiny_llama_dir):
    model, tok = load_tiny(tiny_llama_dir)
    with log_messages() as messages:
        run(model, tok, [FlatQuantModifier(
            epochs=1, target_outputs="model", ignore=["lm_head", "re:model.layers.0.*"])])
    assert any("target_outputs='model', but model.layers.0 was not trained" in m
               and "model.layers.1 reproduces the full-precision layer on its own inputs"
               in m for m in messages)


@pytest.mark.parametrize("model_kind", ["llama", "moe"])
def test_targets_are_the_outputs_of_the_pipelines_calibration_pass(tmp_path, monkeypatch,
                                                                   model_kind):
    """FlatQuant takes a layer's targets and input maxima from llm-compressor's
    calibration pass instead of a pass of its own, training as before; not in a
    layer with routed MoE experts (the calibration pass sends every token through
    every expert)."""
    import flatquant_modifier.calibrate as calibrate

    directory = save_tiny_model_for(Path(f"{model_kind}.yaml"), tmp_path / model_kind)
    passes = []
    full_pass = calibrate.full_precision_pass
    monkeypatch.setattr(calibrate, "full_precision_pass",
                        lambda layer, *a, **k: passes.append(layer) or full_pass(layer, *a, **k))
    runs = {}
    for record in (False, True):
        with monkeypatch.context() as patch:
            if not record:
                patch.setattr(FlatQuantModifier, "_record_targets", lambda self, plan: None)
            model, tok = load_tiny(directory)
            modifier = FlatQuantModifier(epochs=1)
            passes.clear()
            run(model, tok, [modifier])
            runs[record] = modifier
            layers = list(model.model.layers)
        assert passes == (layers if not record else layers[1:] if model_kind == "moe" else [])
    for ours, plain in zip(runs[True].reports, runs[False].reports):
        assert ours.loss_final == pytest.approx(plain.loss_final, rel=1e-5)
    assert len(runs[True].reports) == 2
