"""The training step as CUDA graphs: the same losses and parameters as the eager step
(GPU only; on a CPU the graphs fall back to eager execution, tested here too)."""

from collections import Counter

import pytest
import torch
from torch.utils._pytree import tree_flatten

from flatquant_modifier.batching import assign_steps, call_keys, plan_steps
from flatquant_modifier.cuda_graphs import StepGraphs
from flatquant_modifier.mappings import infer_mappings_from_model, resolve_layer
from flatquant_modifier.calibrate import full_precision_pass
from flatquant_modifier.modules import build_group_params
from flatquant_modifier.options import FlatQuantOptions, Precision
from flatquant_modifier.train import train_layer
from tests.conftest import TINY_MXFP4, build_tiny_llama
from tests.helpers import layer_calls


def test_graphs_run_eagerly_off_cuda():
    graphs = StepGraphs(torch.device("cpu"))
    assert not graphs.enabled
    x = torch.arange(4.0)
    assert torch.equal(graphs("tag", lambda t: t * 2, x), x * 2)
    assert graphs.num_graphs == 0


@pytest.mark.parametrize("report_rtn_loss", [True, False])
def test_a_layer_asks_for_one_graph_per_pass(monkeypatch, report_rtn_loss):
    """The graphs a layer's training asks for, counted on any device (the signatures a
    GPU captures): one for the training steps and one per evaluation pass (the
    round-to-nearest one, before and after training), each pass reading its own fixed
    weights: 4, or 3 without the round-to-nearest report."""
    signatures = []

    def recording_call(self, tag, fn, *args):
        signatures.append(self._signature(tag, tree_flatten(args)[0]))
        return fn(*args)

    monkeypatch.setattr(StepGraphs, "__call__", recording_call)
    device = torch.device("cpu")
    model = build_tiny_llama()
    ids = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0))
    calls = layer_calls(model, model.model.layers[0], ids)
    report, _ = _train(model, 0, calls, device, True, report_rtn_loss=report_rtn_loss)
    assert report.loss_final < report.loss_init
    assert len(set(signatures)) == (4 if report_rtn_loss else 3)
    # one signature per pass for all its sub-batches: the 3 epochs call the training
    # signature three times as often as an evaluation pass calls its own
    calls_per_tag = Counter(signature[0] for signature in signatures)
    evaluations = [n for tag, n in calls_per_tag.items() if tag != "train"]
    assert len(set(evaluations)) == 1 and calls_per_tag["train"] == 3 * evaluations[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_replays_with_new_inputs_and_skips_what_it_cannot_take():
    graphs = StepGraphs(torch.device("cuda"))
    weight = torch.ones(3, device="cuda")

    def fn(x, scale):
        return (x * weight * scale).sum()

    for value in (1.0, 2.0, 3.0):
        x = torch.full((3,), value, device="cuda")
        assert graphs("f", fn, x, 2).item() == 6 * value
    assert graphs.num_graphs == 1
    with torch.no_grad():
        weight.mul_(10)  # parameters updated in place are seen by the replay
    assert graphs("f", fn, torch.ones(3, device="cuda"), 2).item() == 60
    assert graphs("f", fn, torch.ones(2, 3, device="cuda"), 2).item() == 120  # new shape
    assert graphs.num_graphs == 2
    # an argument a graph cannot take (here an arbitrary object) runs eagerly
    class Scale:
        value = 4.0

    assert graphs("g", lambda x, s: (x * s.value).sum(), torch.ones(3, device="cuda"),
                  Scale()).item() == 12
    assert graphs.num_graphs == 2


def _train(model, layer_index, calls, device, cuda_graphs, autocast=None, quant_format="int",
           **extra):
    layer = model.model.layers[layer_index]
    name = f"model.layers.{layer_index}"
    clips = {"learn_weight_clip": True} if quant_format == "mxfp4" else {}  # its clamp too
    options = FlatQuantOptions(epochs=3, cuda_graphs=cuda_graphs, quant_format=quant_format,
                               **clips, **extra)
    # MXFP4: row-parallel transforms block diagonal in 4 blocks
    groups = resolve_layer(name, layer, infer_mappings_from_model(model), ["lm_head"],
                           max_supported_tp=options.max_supported_tp)
    steps = plan_steps(calls, *assign_steps(call_keys(calls), 2))
    targets, act_max = full_precision_pass(layer, steps, groups, device)
    precision = Precision(torch.float32, autocast)
    params = build_group_params(groups, act_max, options, precision.dtype, device,
                                torch.Generator().manual_seed(0))
    report = train_layer(name, layer, groups, params, steps, targets, options, precision,
                         device)
    return report, [p.detach().clone() for g in params for p in g.parameters()]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
@pytest.mark.parametrize("quant_format", ["int", "nvfp4", "mxfp4"])
def test_graphed_training_equals_eager_training(autocast, quant_format):
    """Every format's quantizers can be captured (no host copies, no syncs)."""
    device = torch.device("cuda")  # no index: the tensors say cuda:0
    model = build_tiny_llama(**(TINY_MXFP4 if quant_format == "mxfp4" else {})).to(device)
    ids = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0)).to(device)
    calls = layer_calls(model, model.model.layers[0], ids)
    # the eager quantizers (compiled ones: the next test)
    eager, eager_params = _train(model, 0, calls, device, False, autocast, quant_format,
                                 torch_compile=False)
    graphed, graphed_params = _train(model, 0, calls, device, True, autocast, quant_format,
                                     torch_compile=False)
    # one graph per pass: the round-to-nearest evaluation, the evaluations before and
    # after training (each pass its own, reading that pass's fixed weights), training
    assert eager.cuda_graphs == 0 and graphed.cuda_graphs == 4
    assert graphed.epoch_losses == eager.epoch_losses
    assert graphed.loss_final == eager.loss_final and graphed.loss_rtn == eager.loss_rtn
    for a, b in zip(graphed_params, eager_params):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quant_format", ["int", "nvfp4", "mxfp4"])
def test_compiled_quantizers_are_captured_exactly(quant_format):
    """
    Inductor's fused weight and input quantizers (``torch_compile=True``) run in the
    step graphs exactly as eagerly, and train. (Their gradients are the eager ones:
    tests/test_emulation.py; whole trainings drift apart from the eager quantizers'
    by the rounding of fused arithmetic, amplified by the quantizers' steps.)
    """
    device = torch.device("cuda")
    model = build_tiny_llama(**(TINY_MXFP4 if quant_format == "mxfp4" else {})).to(device)
    ids = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0)).to(device)
    calls = layer_calls(model, model.model.layers[0], ids)
    runs = []
    for graphs in (False, True):
        torch._dynamo.reset()  # both runs compile the same graphs in the same order
        runs.append(_train(model, 0, calls, device, graphs, torch.bfloat16, quant_format,
                           torch_compile=True))
    (eager, eager_params), (graphed, graphed_params) = runs
    assert eager.cuda_graphs == 0 and graphed.cuda_graphs == 4
    assert graphed.epoch_losses == eager.epoch_losses
    assert graphed.loss_final == eager.loss_final
    for a, b in zip(graphed_params, eager_params):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert graphed.loss_final < 0.5 * graphed.loss_rtn
    torch._dynamo.reset()
