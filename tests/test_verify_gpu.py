"""
The placements of tests/test_verify.py on a machine with CUDA (skipped without
it): the model in memory after ``oneshot``, its compressed-tensors checkpoint
reloaded and its Ascend export compute one function wherever the model was
calibrated. Run on a GPU machine with ``python -m pytest -q tests/test_verify_gpu.py``.
"""

import pytest
import torch
from compressed_tensors.utils import get_execution_device

from flatquant_modifier import FlatQuantModifier
from tests.conftest import load_tiny, save_tiny_llama, save_tiny_model_for
from tests.test_distributed import _launch, assert_ranks_compute_the_checkpoints
from tests.helpers import run, weight_quantizer
from tests.test_verify import MOE_RECIPE, assert_one_function

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


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_in_memory_reloaded_and_exported_models_are_one_function(
    placement, tiny_llama_dir, tmp_path
):
    model, tok = load_tiny(tiny_llama_dir)
    kwargs = dict(PLACEMENTS[placement])
    if placement != "model on the CPU":
        model.to(GPU)
    run(model, tok, [FlatQuantModifier(epochs=2), weight_quantizer()], **kwargs)
    assert_one_function(model, tok, tmp_path, device=GPU)
    # the logits in memory (returned on the CPU) were computed on the GPU
    assert get_execution_device(model.get_input_embeddings()).type == "cuda"


@pytest.mark.parametrize("placement", list(PLACEMENTS)[:2])
def test_an_moe_model_is_one_function_wherever_it_was_calibrated(placement, tmp_path):
    model, tok = load_tiny(save_tiny_model_for(MOE_RECIPE, tmp_path / "moe"))
    if placement != "model on the CPU":
        model.to(GPU)
    run(model, tok, str(MOE_RECIPE), **PLACEMENTS[placement])
    assert_one_function(model, tok, tmp_path, device=GPU)
    # the logits in memory (returned on the CPU) were computed on the GPU
    assert get_execution_device(model.get_input_embeddings()).type == "cuda"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("model_on_gpu", [False, True], ids=["model on the CPU",
                                                             "model on the GPU"])
def test_torchrun_on_two_gpus_gives_one_function(model_on_gpu, tmp_path):
    model_dir = save_tiny_llama(tmp_path / "tiny-llama")
    extra = ("--model-on-gpu",) if model_on_gpu else ()
    proc = _launch(model_dir, tmp_path / "out", 2, *extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert_ranks_compute_the_checkpoints(tmp_path / "out", 2, device=GPU)
