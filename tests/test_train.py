"""The optimisation loop of one layer, on its own (through oneshot: tests/test_modifier.py)."""

import pytest
import torch

from flatquant_modifier import FlatQuantModifier
from flatquant_modifier.batching import assign_steps, call_keys, plan_steps
from flatquant_modifier.calibrate import full_precision_pass
from flatquant_modifier.mappings import infer_mappings_from_model, resolve_layer
from flatquant_modifier.modules import build_group_params
from flatquant_modifier.options import FlatQuantOptions, Precision
from flatquant_modifier.train import (
    _flat_gradients,
    _merged_param_groups,
    deterministic_algorithms,
    evaluation_steps,
    layer_loss,
    log_report,
    lr_scheduler,
    train_layer,
)
from tests.conftest import build_tiny_llama, load_tiny
from tests.helpers import layer_calls, log_messages, run


def _first_layer(layer_index: int = 0, **options):
    """The tiny model's first layer (or another one), its steps and targets, and
    initial parameters."""
    model = build_tiny_llama()
    layer = model.model.layers[layer_index]
    name = f"model.layers.{layer_index}"
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    calls = layer_calls(model, layer, ids)
    groups = resolve_layer(name, layer, infer_mappings_from_model(model), ["lm_head"])
    steps = plan_steps(calls, *assign_steps(call_keys(calls), 2))
    device = torch.device("cpu")
    targets, act_max = full_precision_pass(layer, steps, groups, device)
    options = FlatQuantOptions(epochs=4, **options)
    params = build_group_params(groups, act_max, options, torch.float32, device,
                                torch.Generator().manual_seed(0))
    return name, layer, groups, params, steps, targets, options


def _train_first_layer(**options):
    name, layer, groups, params, steps, targets, options = _first_layer(**options)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    report = train_layer(name, layer, groups, params, steps, targets, options,
                         Precision(torch.float32, None), torch.device("cpu"))
    return report, layer, before


@pytest.mark.parametrize("options", [{}, {"loss": "relative"}, {"lr_schedule": "constant"},
                                     {"lr_warmup": 0.3}])
def test_training_lowers_the_loss_and_leaves_the_layer_untouched(options):
    report, layer, before = _train_first_layer(**options)
    assert len(report.epoch_losses) == 4
    assert len(report.epoch_seconds) == 4 and min(report.epoch_seconds) > 0
    assert report.loss_final < report.loss_init and report.loss_final < report.loss_rtn
    assert not report.kept_initial
    for key, value in layer.state_dict().items():  # absorbing is calibrate's job
        assert torch.equal(value, before[key]), key


def _optimizer() -> torch.optim.AdamW:
    """Two parameter groups at the rates 0.02 and 0.2 (as ``lr`` and ``clip_lr``)."""
    return torch.optim.AdamW(
        [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in (0.02, 0.2)])


def _learning_rates(steps: int, **options) -> list[list[float]]:
    """Both parameter groups' learning rates at each of ``steps`` steps."""
    optimizer = _optimizer()
    scheduler = lr_scheduler(optimizer, FlatQuantOptions(**options), steps)
    rates = []
    for _ in range(steps):
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_lr_warmup_rises_linearly_then_follows_the_schedule(schedule):
    """``lr_warmup`` 0.25 of 8 steps: 1/3 and 2/3 of both rates, then the full rates,
    annealed by the cosine over the 6 remaining steps (or kept)."""
    import math

    rates = _learning_rates(8, lr_schedule=schedule, lr_warmup=0.25)
    factors = [1 / 3, 2 / 3] + [
        0.5 * (1 + math.cos(math.pi * k / 6)) if schedule == "cosine" else 1.0
        for k in range(6)]
    for (lr, clip_lr), factor in zip(rates, factors, strict=True):
        assert lr == pytest.approx(0.02 * factor, rel=1e-12)
        assert clip_lr == pytest.approx(0.2 * factor, rel=1e-12)


@pytest.mark.parametrize("fraction, steps, warmup", [
    (0.1, 30, 3), (0.1, 31, 4), (0.1, 5, 1), (0.95, 10, 9), (0.9, 1, 0), (0.5, 0, 0)])
def test_lr_warmup_is_rounded_up_and_leaves_a_step_at_the_full_rates(fraction, steps,
                                                                     warmup):
    rates = _learning_rates(steps, lr_warmup=fraction)
    factors = [lr / 0.02 for lr, _ in rates]
    assert factors[:warmup] == pytest.approx([(k + 1) / (warmup + 1) for k in range(warmup)])
    if steps:
        assert factors[warmup] == pytest.approx(1.0)


def test_no_lr_warmup_is_torchs_own_cosine():
    """Without warmup the rates are ``CosineAnnealingLR``'s, bit for bit (the paper's
    schedule and the float64 pins)."""
    rates = _learning_rates(8)
    optimizer = _optimizer()
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=8, eta_min=0.0)
    for step_rates in rates:
        assert step_rates == [group["lr"] for group in optimizer.param_groups]
        optimizer.step()
        cosine.step()
    with pytest.raises(ValueError, match="lr_warmup"):
        FlatQuantOptions(lr_warmup=1.0)


def test_the_round_to_nearest_loss_is_a_report_only():
    """``report_rtn_loss=False`` skips that evaluation and trains the same."""
    reference, _, _ = _train_first_layer()
    report, _, _ = _train_first_layer(report_rtn_loss=False)
    assert reference.loss_rtn > reference.loss_init and report.loss_rtn is None
    assert (report.loss_init, report.loss_final, report.epoch_losses) == (
        reference.loss_init, reference.loss_final, reference.epoch_losses)
    for r in (reference, report):  # the evaluation passes: outside the epochs' steps
        assert 0 < r.evaluation_seconds <= r.seconds - sum(r.epoch_seconds)
    with log_messages("INFO") as messages:
        log_report(report)
    assert "round-to-nearest" not in messages[0] and "->" in messages[0]


@pytest.mark.parametrize("samples, batch_size, num_steps, expected", [
    (None, 4, 5, [0, 1, 2, 3, 4]),
    (32, 4, 32, [0, 4, 8, 12, 16, 20, 24, 28]),  # 128 samples: a quarter, spread
    (32, 4, 8, list(range(8))),  # the CPU main job's 32 samples: all
    (10, 4, 8, [0, 2, 5]),  # whole steps, rounded up
    (1, 4, 32, [0]),
    (32, 4, 3, [0, 1, 2]),
    (32, 4, 0, []),
])
def test_evaluation_steps_are_spread_over_the_epoch(samples, batch_size, num_steps,
                                                     expected):
    options = FlatQuantOptions(evaluation_samples=samples, batch_size=batch_size)
    assert evaluation_steps(num_steps, options) == expected


def test_evaluation_samples_measure_a_subset_and_train_the_same():
    """``evaluation_samples`` of one step's samples: the three evaluation losses are
    those of that step alone (a run on it alone gives them), the training and its
    epoch losses are the run's on all steps; samples enough for every step are the
    run's on all samples exactly."""
    reference, _, _ = _train_first_layer(batch_size=2, evaluation_samples=None)
    everything, _, _ = _train_first_layer(batch_size=2, evaluation_samples=4)
    subset, _, _ = _train_first_layer(batch_size=2, evaluation_samples=2)
    assert (everything.loss_rtn, everything.loss_init, everything.loss_final) == (
        reference.loss_rtn, reference.loss_init, reference.loss_final)
    assert subset.epoch_losses == reference.epoch_losses
    assert subset.loss_init != reference.loss_init

    name, layer, groups, params, steps, targets, options = _first_layer(
        batch_size=2, evaluation_samples=None)
    assert len(steps) == 2
    first = FlatQuantOptions(**{**options.model_dump(), "epochs": 0})
    alone = train_layer(name, layer, groups, params, steps[:1], targets[:1], first,
                        Precision(torch.float32, None), torch.device("cpu"))
    assert (subset.loss_rtn, subset.loss_init) == (alone.loss_rtn, alone.loss_init)
    with pytest.raises(ValueError, match="evaluation_samples"):
        FlatQuantOptions(evaluation_samples=0)


def test_training_that_raises_the_loss_keeps_the_initial_state():
    """At a learning rate far too high the loss ends above its initial value: the
    initial transforms, smoothing and clip factors stay, their loss is the final one,
    and a warning names the layer."""
    name, layer, groups, params, steps, targets, options = _first_layer(lr=0.3, clip_lr=0.3)
    initial = [p.detach().clone() for g in params for group in g.param_groups(options)
               for p in group["params"]]
    with log_messages() as messages:
        report = train_layer(name, layer, groups, params, steps, targets, options,
                             Precision(torch.float32, None), torch.device("cpu"))
    assert report.kept_initial
    assert max(report.epoch_losses) > 100 * report.loss_init
    assert report.loss_final == report.loss_init
    trained = [p for g in params for group in g.param_groups(options) for p in group["params"]]
    assert len(trained) == len(initial) > 0
    for before, after in zip(initial, trained):
        assert torch.equal(before, after)
    assert any(f"training raised the loss of layer {name}" in str(m) for m in messages)


def test_constant_schedule_differs_from_cosine():
    cosine, _, _ = _train_first_layer()
    constant, _, _ = _train_first_layer(lr_schedule="constant")
    # one step per epoch here: the first one at the same lr
    assert cosine.epoch_losses[0] == constant.epoch_losses[0]
    assert cosine.loss_final != constant.loss_final


def test_relative_loss_is_the_mean_relative_error_per_token():
    target = torch.tensor([[[3.0, 4.0], [30.0, 40.0]]], dtype=torch.float64)
    out = target + torch.tensor([[[1.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)
    # per token: error 1.0 over mean squares 12.5 and 1250
    assert layer_loss(out, target, "relative").item() == pytest.approx(
        (1 / 12.5 + 1 / 1250) / 2, rel=1e-15)
    assert layer_loss(out, target, "mse").item() == 1.0
    zero = torch.zeros(1, 1, 2, dtype=torch.float64)
    assert torch.isfinite(layer_loss(zero, zero, "relative"))


def test_deterministic_algorithms_is_scoped():
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_algorithms():
        assert torch.are_deterministic_algorithms_enabled()
    with deterministic_algorithms(False):
        assert not torch.are_deterministic_algorithms_enabled()
    assert not torch.are_deterministic_algorithms_enabled()


def test_deterministic_option_restores_the_global_mode(tiny_llama_dir):
    model, tok = load_tiny(tiny_llama_dir)
    modifier = FlatQuantModifier(epochs=1, deterministic=True)
    run(model, tok, [modifier])
    assert len(modifier.reports) == 2
    assert not torch.are_deterministic_algorithms_enabled()




@pytest.mark.parametrize("quant_format", ["int", "nvfp4"])
def test_compiled_training_forward_is_one_graph_shared_by_layers(monkeypatch, quant_format):
    """
    ``torch_compile=True`` traces a layer's training forward (the layer, its weight
    and input quantizers, the loss) as one graph, without graph breaks, and the next
    layer of the same shape reuses it (training steps only; the evaluation passes stay
    eager). Traced without code generation ("aot_eager") the training is the eager one
    exactly; inductor's fused kernels: tests/test_emulation.py, tests/test_cuda_graphs.py.
    """
    from torch._dynamo.utils import counters

    from flatquant_modifier import emulation

    graph_outputs = []

    def recording(graph_module, example_inputs):
        (output,) = [n for n in graph_module.graph.nodes if n.op == "output"]
        graph_outputs.append(len(output.args[0]))
        return torch._dynamo.lookup_backend("aot_eager")(graph_module, example_inputs)

    monkeypatch.setattr(emulation, "COMPILE_BACKEND", recording)
    torch._dynamo.reset()
    counters.clear()
    eager, _, _ = _train_first_layer(quant_format=quant_format, torch_compile=False)
    assert counters["stats"]["unique_graphs"] == 0
    traced, _, _ = _train_first_layer(quant_format=quant_format, torch_compile=True)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    assert not counters["unimplemented"]  # no recompile limit, no graph break
    # the loss alone leaves the graph: a step's cached matrices, weights and inputs
    # would each be an extra output, written out and given a zero-filled gradient
    assert graph_outputs == [1]
    assert traced.epoch_losses == eager.epoch_losses
    assert (traced.loss_rtn, traced.loss_init, traced.loss_final) == (
        eager.loss_rtn, eager.loss_init, eager.loss_final)
    # the second layer: a new module and new parameters, the same graph
    name, layer, groups, params, steps, targets, options = _first_layer(
        quant_format=quant_format, torch_compile=True, layer_index=1)
    train_layer(name, layer, groups, params, steps, targets, options,
                Precision(torch.float32, None), torch.device("cpu"))
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["recompiles"]
    torch._dynamo.reset()


def test_a_failing_compilation_trains_eagerly_with_a_warning(monkeypatch):
    from flatquant_modifier import emulation

    def broken(fn):
        def compiled(*args):
            raise RuntimeError("no backend")
        return compiled

    monkeypatch.setattr(emulation, "compile_step", broken)
    eager, _, _ = _train_first_layer(torch_compile=False)
    with log_messages() as messages:
        fallback, _, _ = _train_first_layer(torch_compile=True)
    assert fallback.epoch_losses == eager.epoch_losses
    assert fallback.loss_final == eager.loss_final
    warnings = [str(m) for m in messages if "compiled training forward" in str(m)]
    assert len(warnings) == 1  # once: the layer then trains eagerly
    assert "layer model.layers.0 failed (RuntimeError: no backend)" in warnings[0]


def test_torch_compile_auto_is_for_long_int_trainings_on_cuda():
    from flatquant_modifier.emulation import AUTO_COMPILE_MIN_WORK, use_torch_compile

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    auto = FlatQuantOptions()
    smollm2 = 3_538_944  # SmolLM2-135M's transformed weights per layer
    paper_budget = 15 * 128 * 2048  # tokens: 15 epochs of 128 x 2048
    llama3_8b = 218_103_808
    assert smollm2 * paper_budget >= AUTO_COMPILE_MIN_WORK
    assert smollm2 * 2 * 32 * 512 < AUTO_COMPILE_MIN_WORK  # the CPU main job's budget
    assert llama3_8b * 128 * 2048 >= AUTO_COMPILE_MIN_WORK  # one epoch
    assert not use_torch_compile(auto, cpu, smollm2, paper_budget)
    assert not use_torch_compile(auto, cuda, smollm2, 2 * 32 * 512)
    assert not use_torch_compile(auto, cuda, llama3_8b)  # no tokens given: eager
    assert not use_torch_compile(FlatQuantOptions(quant_format="nvfp4"), cuda, smollm2,
                                 paper_budget)
    assert use_torch_compile(FlatQuantOptions(torch_compile=True), cpu, 1)
    assert not use_torch_compile(FlatQuantOptions(torch_compile=False), cuda, llama3_8b,
                                 paper_budget)
    # with Triton, long int trainings on CUDA compile
    import importlib.util
    assert use_torch_compile(auto, cuda, smollm2, paper_budget) == (
        importlib.util.find_spec("triton") is not None)


def test_train_layer_counts_the_tokens_of_all_epochs_for_auto(monkeypatch):
    from flatquant_modifier import emulation

    seen = []

    def record(options, device, num_weights, training_tokens=0):
        seen.append((num_weights, training_tokens))
        return False

    monkeypatch.setattr(emulation, "use_torch_compile", record)
    name, layer, groups, params, steps, targets, options = _first_layer()
    train_layer(name, layer, groups, params, steps, targets, options,
                Precision(torch.float32, None), torch.device("cpu"))
    tokens = sum(kwargs["hidden_states"].shape[:-1].numel()
                 for batches in steps for kwargs in batches)
    weights = sum(linear.weight.numel() for g in groups for _, linear in g.linears)
    assert seen and set(seen) == {(weights, options.epochs * tokens)}


def test_auto_counts_the_tokens_of_hidden_states_given_after_other_arguments(monkeypatch):
    """A call caught by a forward pre-hook holds the positional hidden states after
    ``position_ids``; the tokens are still those of the hidden states."""
    from flatquant_modifier import emulation

    seen = []

    def record(options, device, num_weights, training_tokens=0):
        seen.append(training_tokens)
        return False

    monkeypatch.setattr(emulation, "use_torch_compile", record)
    name, layer, groups, params, steps, targets, options = _first_layer()
    late = [[{"position_ids": torch.arange(k["hidden_states"].shape[1])[None]
                              .expand(k["hidden_states"].shape[0], -1),
              **{key: v for key, v in k.items() if key != "hidden_states"},
              "hidden_states": k["hidden_states"]} for k in batches] for batches in steps]
    train_layer(name, layer, groups, params, late, targets, options,
                Precision(torch.float32, None), torch.device("cpu"))
    tokens = sum(k["hidden_states"].shape[:-1].numel() for b in steps for k in b)
    assert seen and set(seen) == {options.epochs * tokens}


def test_compiled_layers_keep_bfloat16_weights_and_cast_them_exactly():
    from flatquant_modifier.emulation import FakeQuantizedLayer, layer_output

    model = build_tiny_llama().to(torch.bfloat16)
    layer = model.model.layers[0]
    groups = resolve_layer("model.layers.0", layer, infer_mappings_from_model(model),
                           ["lm_head"])
    options = FlatQuantOptions(torch_compile=True)  # eager layers store float32
    params = build_group_params(groups, [None] * len(groups), options, torch.float32,
                                torch.device("cpu"), torch.Generator().manual_seed(0))
    emulated = FakeQuantizedLayer(groups, params, options, Precision(torch.float32, None),
                                  torch.device("cpu"))
    assert all(w.dtype == torch.bfloat16 for w in emulated.weights)
    reference = FakeQuantizedLayer(groups, params, options, Precision(torch.float32, None),
                                   torch.device("cpu"))
    reference.weights = [w.float() for w in reference.weights]
    hidden = torch.randn(1, 8, layer.self_attn.q_proj.in_features).to(torch.bfloat16)
    position = torch.arange(8).unsqueeze(0)
    embeddings = model.model.rotary_emb(hidden, position)
    outputs = []
    with torch.no_grad():
        for emulation_ in (emulated, reference):
            with emulation_.patched():
                emulation_.new_step()
                outputs.append(layer_output(layer(hidden, position_embeddings=embeddings)))
    assert torch.equal(outputs[0], outputs[1])


def test_gradient_views_refuse_a_non_contiguous_parameter():
    """Each ``.grad`` is a contiguous view of the flat buffer: a parameter of another
    layout is refused by name (fused AdamW on CUDA would reject the pair)."""
    params = [torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(3, 4).t())]
    with pytest.raises(ValueError, match=r"shape \(4, 3\) is not contiguous"):
        _flat_gradients(params, torch.device("cpu"))
    buffer, views = _flat_gradients(params[:1], torch.device("cpu"))
    assert params[0].grad is views[0] and views[0].data_ptr() == buffer.data_ptr()


def test_parameter_groups_of_equal_settings_are_merged_in_order():
    a, b, c, d = (torch.nn.Parameter(torch.zeros(2)) for _ in range(4))
    groups = [{"params": [a], "lr": 1e-2}, {"params": [b], "lr": 1e-1},
              {"params": [c], "lr": 1e-2}, {"params": [d], "lr": 1e-1}]
    merged = _merged_param_groups(groups)
    assert [(g["lr"], g["params"]) for g in merged] == [(1e-2, [a, c]), (1e-1, [b, d])]
    assert groups[0]["params"] == [a]  # the given groups are left as they were
