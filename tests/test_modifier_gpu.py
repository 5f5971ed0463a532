"""FlatQuantModifier on CUDA (skipped without it): ``deterministic=True`` gives the
same model in two runs. Run on a GPU machine with
``python -m pytest -q tests/test_modifier_gpu.py``."""

import pytest
import torch

from flatquant_modifier import FlatQuantModifier
from flatquant_modifier.transform import get_flatquant_transform
from tests.conftest import load_tiny
from tests.helpers import logits, run, weight_quantizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def calibrate(model_dir, **options):
    model, tok = load_tiny(model_dir)
    model.to("cuda:0")
    modifier = FlatQuantModifier(epochs=3, **options)
    run(model, tok, [modifier, weight_quantizer()], num_samples=16, seq_len=64,
        sequential_offload_device="cuda:0")
    transforms = {
        name: get_flatquant_transform(module).left_trans.detach().cpu().clone()
        for name, module in model.named_modules()
        if get_flatquant_transform(module) is not None
    }
    return modifier, transforms, logits(model).cpu()


def test_deterministic_runs_give_the_same_model(tiny_llama_dir):
    first = calibrate(tiny_llama_dir, deterministic=True)
    second = calibrate(tiny_llama_dir, deterministic=True)
    assert [r.epoch_losses for r in first[0].reports] == [
        r.epoch_losses for r in second[0].reports
    ]
    for name, value in first[1].items():
        assert torch.equal(value, second[1][name]), name
    assert torch.equal(first[2], second[2])
    assert not torch.are_deterministic_algorithms_enabled()  # restored


@pytest.mark.parametrize("placement", ["model on the GPU", "model on the CPU"])
def test_pipeline_forwards_run_sdpa_on_cuda_by_default(tiny_llama_dir, placement):
    # pipeline_sdpa="auto": the forwards llm-compressor runs on CUDA switch to SDPA once
    # a layer of the class checked it, also when the model stays in CPU memory and the
    # pipeline onloads each layer
    model, tok = load_tiny(tiny_llama_dir)
    seen = []
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_pre_hook(
            lambda module, args, kwargs, index=index: seen.append(
                (index, model.config._attn_implementation,
                 kwargs["hidden_states"].shape[0], kwargs["hidden_states"].device.type)),
            with_kwargs=True)
    on_gpu = placement == "model on the GPU"
    if on_gpu:
        model.to("cuda:0")
    run(model, tok, [FlatQuantModifier(epochs=1)], num_samples=8, batch_size=8,
        sequential_offload_device="cuda:0" if on_gpu else "cpu")
    pipeline = [(index, implementation, device) for index, implementation, batch, device
                in seen if batch == 8]
    assert pipeline == [(0, "eager", "cuda"), (0, "sdpa", "cuda"), (1, "sdpa", "cuda"),
                        (1, "sdpa", "cuda")]
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("placement", ["model on the GPU", "model on the CPU"])
def test_targets_come_from_the_calibration_pass_on_cuda(tiny_llama_dir, monkeypatch, placement):
    # the pipeline's calibration pass (eager, then SDPA with its mask) records the
    # targets and input maxima FlatQuant's own pass gives (SDPA, causal kernels), to
    # the rounding of another attention kernel, in every layer
    import flatquant_modifier.calibrate as calibrate

    passes, compared = [], []
    full_pass, recorded_targets = calibrate.full_precision_pass, calibrate.recorded_targets

    def checked(name, layer, steps, groups, device, *args, **kwargs):
        result = recorded_targets(name, layer, steps, groups, device, *args, **kwargs)
        targets, act_max = full_pass(layer, steps, groups, device)
        for ours, theirs in zip([t for s in result[0] for t in s] + result[1],
                                [t for s in targets for t in s] + act_max):
            torch.testing.assert_close(ours, theirs, rtol=1e-4,
                                       atol=1e-4 * float(theirs.abs().max()))
        compared.append(name)
        return result

    monkeypatch.setattr(calibrate, "full_precision_pass",
                        lambda *a, **k: passes.append(1) or full_pass(*a, **k))
    monkeypatch.setattr(calibrate, "recorded_targets", checked)
    on_gpu = placement == "model on the GPU"
    model, tok = load_tiny(tiny_llama_dir)
    if on_gpu:
        model.to("cuda:0")
    run(model, tok, [FlatQuantModifier(epochs=1)], num_samples=16, seq_len=64,
        sequential_offload_device="cuda:0" if on_gpu else "cpu")
    assert compared == ["model.layers.0", "model.layers.1"] and passes == []
