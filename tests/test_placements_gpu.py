"""
The placements of tests/test_placements.py on a machine with CUDA (skipped without
it): the model in memory after ``oneshot``, its compressed-tensors checkpoint
reloaded and its Ascend export compute one function wherever the model was
calibrated. Run on a GPU machine with ``python -m pytest -q tests/test_placements_gpu.py``.
"""

import pytest
import torch
from transformers import CompressedTensorsConfig

from flatquant_modifier import FlatQuantModifier, load_flatquant_model
from flatquant_modifier.ascend import save_ascend_checkpoint
from tests.conftest import load_tiny, save_tiny_llama
from tests.test_ascend_export import assert_same_function, exact_logits
from tests.test_distributed import _dump, _launch
from tests.test_modifier import logits, run, weight_quantizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

GPU = "cuda:0"
PLACEMENTS = {
    # from_pretrained's default, as llm-compressor's examples load: the model stays in
    # CPU memory and the sequential pipeline onloads one layer at a time to the GPU
    "model on the CPU": {},
    "model on the GPU": {"sequential_offload_device": GPU},
    "model on the GPU, oneshot batch_size 2": {"sequential_offload_device": GPU,
                                               "batch_size": 2},
}


def assert_one_function_on_gpu(model, tok, tmp_path):
    """In memory (GPU) == the reloaded checkpoint on the same GPU (same kernels), and
    the reload == the Ascend export in float64 on the CPU."""
    in_memory = logits(model)
    assert in_memory.device.type == "cuda"
    ascend = save_ascend_checkpoint(model, tmp_path / "ascend", tok)
    model.save_pretrained(tmp_path / "ct", save_compressed=True)
    reloaded = load_flatquant_model(
        tmp_path / "ct", quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    torch.testing.assert_close(logits(reloaded.to(GPU)), in_memory, atol=1e-5, rtol=0)
    assert_same_function(ascend, exact_logits(reloaded.cpu()))
    return in_memory


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_in_memory_reloaded_and_exported_models_are_one_function(
    placement, tiny_llama_dir, tmp_path
):
    model, tok = load_tiny(tiny_llama_dir)
    kwargs = dict(PLACEMENTS[placement])
    if placement != "model on the CPU":
        model.to(GPU)
    run(model, tok, [FlatQuantModifier(epochs=2), weight_quantizer()], **kwargs)
    assert_one_function_on_gpu(model, tok, tmp_path)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("model_on_gpu", [False, True], ids=["model on the CPU",
                                                             "model on the GPU"])
def test_torchrun_on_two_gpus_gives_one_function(model_on_gpu, tmp_path):
    model_dir = save_tiny_llama(tmp_path / "tiny-llama")
    extra = ("--model-on-gpu",) if model_on_gpu else ()
    proc = _launch(model_dir, tmp_path / "out", 2, *extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = tmp_path / "out"
    reloaded = load_flatquant_model(
        out / "compressed-rank0", quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    reference = logits(reloaded.to(GPU)).cpu()
    for rank in (0, 1):
        torch.testing.assert_close(_dump(out, rank)["logits"], reference, atol=1e-5,
                                   rtol=0, msg=lambda m: f"rank {rank}: {m}")
    assert_same_function(out / "ascend-rank0", exact_logits(reloaded.cpu()))
