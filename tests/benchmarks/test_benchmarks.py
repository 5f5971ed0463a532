"""The benchmark scripts' own logic (tables, plots, checkpoint comparison) on small
made-up inputs; the benchmarks themselves are run by hand, not by the tests."""

import importlib.util
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_method_table_and_plot(tmp_path):
    compare_methods = _load("compare_methods")
    result = {
        "eval": "first 8 windows", "calibration": "32 x 512", "device": "cpu",
        "rows": [
            {"method": "fp", "ppl": 20.0, "calibration_seconds": 0.0, "peak_rss_GiB": 1.0},
            {"method": "rtn", "ppl": 8000.0, "calibration_seconds": 3.0,
             "peak_rss_GiB": 1.5},
            {"method": "flatquant-rtn", "ppl": 28.0, "calibration_seconds": 100.0,
             "peak_gpu_GiB": 2.0, "peak_rss_GiB": 3.0},
        ],
    }
    text = compare_methods.table(result)
    assert "| rtn | 8000.00 | 400.00x | 3.0 s | 1.5 GiB RSS |" in text
    assert "| flatquant-rtn | 28.00 | 1.40x | 100.0 s | 2.0 GiB GPU |" in text
    compare_methods.plot(result, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_comparison(tmp_path):
    compare_checkpoints = _load("compare_checkpoints")
    base = {
        "model.layers.0.q_proj.flatquant_input.left_trans": torch.eye(4),
        "model.layers.0.q_proj.flatquant_input.clip_ratio": torch.tensor([0.9]),
        "model.layers.0.q_proj.weight_packed": torch.tensor([1, 2, 3], dtype=torch.int32),
        "model.embed_tokens.weight": torch.ones(2, 2),
    }
    other = dict(base)
    other["model.layers.0.q_proj.flatquant_input.left_trans"] = torch.eye(4) * 1.25
    other["model.layers.0.q_proj.weight_packed"] = torch.tensor([1, 2, 4], dtype=torch.int32)
    for name, tensors in (("a", base), ("b", other)):
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors")
    result = compare_checkpoints.compare(tmp_path / "a", tmp_path / "b")
    assert result["left_trans"]["max_abs_diff"] == 0.25
    assert result["clip_ratio"]["max_abs_diff"] == 0.0
    assert result["weight_packed"]["differing_words"] == 1
    assert "weight" not in result  # embeddings are not FlatQuant tensors


def test_placement_table():
    placements = _load("placements")
    text = placements.table({
        "gpu": {"calibration_seconds": 29.2, "ppl_w4a4": 27.672, "ppl_reloaded": 27.672,
                "ppl_ascend_reference": 27.56},
        "cpu": {"calibration_seconds": 29.4, "ppl_w4a4": 27.672},
    })
    assert "| placement | calibration | in memory | compressed-tensors reload | Ascend " in text
    assert "| gpu | 29.2 s | 27.67 | 27.67 | 27.56 |" in text
    assert "| cpu | 29.4 s | 27.67 | - | - |" in text


def test_variant_table_over_seeds_and_gptq_options():
    variants = _load("variants")
    rows = [
        {"variant": "default", "seed": 0, "ppl_all": 29.5, "calibration_seconds": 140.0,
         "peak_gpu_GiB": 7.5},
        {"variant": "default", "seed": 1, "ppl_all": 28.5, "calibration_seconds": 150.0,
         "peak_gpu_GiB": 7.7},
        {"variant": "gptq", "seed": 0, "ppl_all": 28.0, "calibration_seconds": 160.0,
         "peak_rss_GiB": 3.0},
    ]
    text = variants.table(rows, ["ppl_all"])
    assert "| default | 0,1 | 29.00 [28.50-29.50] | 145.0 | 7.7 GiB |" in text
    assert "| gptq | 0 | 28.00 | 160.0 | 3.0 GiB |" in text
    _, options = variants.GPTQ_VARIANTS["gptq-mse-observer"]
    gptq = variants.quantizer("w4a4", True, options)
    assert gptq.config_groups["group_0"].weights.observer == "memoryless-mse"
    _, options = variants.GPTQ_VARIANTS["gptq-damp-0.1"]
    gptq = variants.quantizer("w4a4", True, options)
    assert gptq.dampening_frac == 0.1
    assert gptq.config_groups["group_0"].weights.observer == "minmax"


def test_every_variant_gives_valid_modifiers():
    from flatquant_modifier import FlatQuantModifier

    variants = _load("variants")
    for name, kwargs in variants.VARIANTS.items():
        if kwargs is not None:
            FlatQuantModifier(**kwargs)
    for name, (kwargs, gptq) in variants.GPTQ_VARIANTS.items():
        FlatQuantModifier(**kwargs)
        variants.quantizer("w4a4", True, gptq)


def test_rounding_perturbation_moves_the_first_layer_input_by_its_size():
    from tests.conftest import build_tiny_llama

    rounding = _load("rounding_sensitivity")
    model = build_tiny_llama().double()
    seen = []
    model.model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True,
    )
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        model(ids)
        handle = rounding.perturb_first_layer(model, seed=0, size=1e-7)
        model(ids)
        handle.remove()
    relative = ((seen[1] - seen[0]) / seen[0]).abs()
    assert 1e-9 < float(relative.max()) < 1e-6


def test_oneshot_scale_sets_the_epochs_of_the_recipe(tmp_path):
    import yaml

    with_epochs = _load("oneshot_scale").with_epochs
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "flatquant_w4a4.yaml"
    text, recipe_epochs = with_epochs(recipe, 5)
    assert recipe_epochs == 15
    modifiers = yaml.safe_load(text)["quant_stage"]["quant_modifiers"]
    assert modifiers["FlatQuantModifier"]["epochs"] == 5
    assert modifiers["FlatQuantModifier"]["lr"] == 0.02  # the rest as it was
    assert yaml.safe_load(with_epochs(recipe, None)[0]) == yaml.safe_load(recipe.read_text())
    other = tmp_path / "gptq.yaml"
    other.write_text("stage:\n  modifiers:\n    GPTQModifier:\n      targets: Linear\n")
    with pytest.raises(SystemExit, match="no FlatQuantModifier"):
        with_epochs(other, 5)


def test_oneshot_scale_counts_setup_and_compilation_once():
    project = _load("oneshot_scale").project_seconds
    # 8 of 32 layers reached at these times: the first layer 20 s (compilation), then
    # 9 s a layer (one slower), the run 98 s in all
    starts = [5.0, 25.0, 34.0, 43.0, 52.5, 61.0, 70.0, 79.0]
    once, projected = project(98.0, starts, [0.8] * 8, 0, 8, 32)
    assert once == pytest.approx(98.0 - 8 * 9.0)
    assert projected == pytest.approx(once + 32 * 9.0)
    # the left-out epochs at each layer's last epoch time, for every layer of the depth
    _, longer = project(98.0, starts, [0.8] * 8, 10, 8, 32)
    assert longer - projected == pytest.approx(10 * 0.8 * 32)
    # the full depth projects itself
    full = [0.0, 20.0] + [20.0 + 5.0 * k for k in range(1, 31)]
    assert project(180.0, full, [1.0] * 32, 0, 32, 32)[1] == pytest.approx(180.0)
    # one layer has nothing to compare with; two take the first layer's time
    assert project(30.0, [1.0], [1.0], 0, 1, 32) == (0.0, 30.0 * 32)
    assert project(30.0, [1.0, 21.0], [1.0, 1.0], 0, 2, 32) == (0.0, 20.0 * 32)


def test_step_kernel_table_is_the_difference_of_two_runs_per_step():
    profile_layer = _load("profile_layer")
    # microseconds and launches: the 1-epoch run has the evaluation passes' kernels too
    shorter = {"nvjet_sm90_tst_256x128": (4000.0, 8), "triton_poi_fused_round": (900.0, 4),
               "cudnn_generated_fort_native_sdpa_sm90_flash_fprop": (300.0, 6)}
    longer = {"nvjet_sm90_tst_256x128": (8000.0, 16), "triton_poi_fused_round": (1500.0, 8),
              "cudnn_generated_fort_native_sdpa_sm90_flash_fprop": (500.0, 10),
              "Memcpy DtoD (Device -> Device)": (100.0, 4)}
    text = profile_layer.step_kernel_table(shorter, longer, steps=2)
    assert "GPU kernel time per step: 2.45 ms" in text
    assert "| GEMM | 2.00 | 81.6 % |" in text
    assert "| compiled (Triton) | 0.30 | 12.2 % |" in text
    assert "| attention | 0.10 | 4.1 % |" in text
    assert "| copies and casts | 0.05 | 2.0 % |" in text
    assert "| 2.000 | 4.0 | nvjet_sm90_tst_256x128 |" in text
    assert profile_layer.kernel_category("void at::native::vectorized_elementwise_kernel<4, "
                                         "CUDAFunctor_add<float>>") == "eager elementwise"
    assert profile_layer.kernel_category("getrf_pivot<float>") == "other"
    assert profile_layer.kernel_category(
        "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<"
        "at::native::BinaryFunctor<c10::BFloat16, c10::BFloat16, c10::BFloat16, "
        "at::native::binary_internal::MulFunctor<float> > >") == "eager elementwise"
    assert profile_layer.kernel_category(
        "void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda"
        "(at::TensorIteratorBase&)::{lambda(float)#1}>") == "copies and casts"


def test_weights_a_hair_above_the_tie_are_sent_to_minus_eight():
    weight_ties = _load("weight_ties")
    scale = torch.tensor([[0.5], [2.0]])
    # levels: row 0 -7.49999 (rounds to -7), -7.5 (exact tie: -8), -3, 7.5; row 1 none
    weight = torch.tensor([[-3.749995, -3.75, -1.5, 3.75], [4.0, -2.0, 15.0, 0.0]])
    mask = weight_ties.tied_low(weight, scale)
    assert mask.tolist() == [[True, False, False, False], [False] * 4]
    assert weight_ties.at_tie(weight, scale).tolist() == [True, False]
    assert torch.round(weight / scale)[0, 0] == -7
    weight_ties.send_to_minus_eight(weight, scale, mask)
    assert torch.round(weight / scale)[0].tolist() == [-8.0, -8.0, -3.0, 8.0]
    assert weight[1].tolist() == [4.0, -2.0, 15.0, 0.0]
    row = {"recipe": "r.yaml", "rows": 10, "rows_at_tie": 8, "rows_rounded_to_minus_7": 1,
           "weights_rounded_to_minus_7": 3, "ppl_as_saved": 29.7, "ppl_ties_at_minus_8": 29.6}
    assert "| r.yaml | 10 | 8 | 1 / 3 | 29.700 | 29.600 |" in weight_ties.table(row)


def test_profile_run_profiles_the_chosen_layer_only(tmp_path):
    from types import SimpleNamespace

    profile_run = _load("profile_run")

    def train_layer(name, epochs=3, steps=4):
        weight = torch.nn.Parameter(torch.ones(4))
        optimizer = torch.optim.SGD([weight], lr=0.1)
        for _ in range(epochs * steps):
            weight.grad = torch.ones(4)
            optimizer.step()
        return SimpleNamespace(epoch_seconds=[0.004] * epochs)

    report = {"epoch_seconds": {}}
    wrapped = profile_run.profiled_training(train_layer, 1, 2, 3, tmp_path, report)
    wrapped("model.layers.0")
    assert "profiled" not in report and not (tmp_path / "trace.json").exists()
    wrapped("model.layers.1")
    assert report["profiled"]["layer"] == "model.layers.1"
    assert report["profiled"]["steps"] == [2, 5]
    assert report["profiled"]["ms_per_step_by_epoch"] == [1.0, 1.0, 1.0]  # 4 ms / 4 steps
    assert set(report["epoch_seconds"]) == {"model.layers.0", "model.layers.1"}
    assert (tmp_path / "trace.json").exists() and (tmp_path / "kernels.md").read_text()


def test_profile_run_between_profiles_the_time_between_two_trainings(tmp_path):
    from types import SimpleNamespace

    profile_run = _load("profile_run")

    def train_layer(name):
        return SimpleNamespace(epoch_seconds=[0.001])

    def between_layers():
        time.sleep(0.05)

    report = {"epoch_seconds": {}}
    wrapped = profile_run.profiled_between(train_layer, 2, tmp_path, report)
    wrapped("model.layers.0")
    between_layers()  # before the window: not profiled
    wrapped("model.layers.1")
    between_layers()
    wrapped("model.layers.2")
    wrapped("model.layers.3")
    between = report["between"]
    assert between["layer"] == "model.layers.2"
    assert 50 <= between["wall_ms"] < 50 + 40
    functions = {name.split(": ")[-1]: ms for name, ms, _ in between["python_ms"]}
    assert 50 <= functions["between_layers"] <= between["wall_ms"]
    # the stack the window started in (this test, pytest) is left out
    assert "test_profile_run_between_profiles_the_time_between_two_trainings" not in functions
    assert set(report["epoch_seconds"]) == {f"model.layers.{i}" for i in range(4)}
    assert (tmp_path / "trace.json").exists()


def test_layer_inputs_hold_the_hidden_states_first_as_the_pipeline_caches_them():
    from tests.conftest import build_tiny_llama

    model = build_tiny_llama()
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    calls = _load("profile_layer").layer_inputs(model, model.model.layers[0], ids)
    assert len(calls) == 2
    for call in calls:
        assert next(iter(call)) == "hidden_states"
        assert call["hidden_states"].shape == (1, 8, model.config.hidden_size)


def test_scale_decides_auto_compilation_for_the_budget_not_the_measured_epochs(monkeypatch):
    from types import SimpleNamespace

    from flatquant_modifier.options import FlatQuantOptions

    decided_for_budget = _load("scale").decided_for_budget
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",  # as on a GPU host with triton
                        lambda name, *a: object() if name == "triton" else find_spec(name, *a))
    # Qwen3-30B-A3B's attention (hidden 2048, 32 / 4 heads of 128): 18.9 M weights
    with torch.device("meta"):
        groups = [SimpleNamespace(linears=[(n, torch.nn.Linear(i, o, bias=False))
                                           for n, i, o in linears])
                  for linears in ([("q", 2048, 4096), ("k", 2048, 512), ("v", 2048, 512)],
                                  [("o", 4096, 2048)])]
    options = FlatQuantOptions(epochs=1, torch_compile="auto")
    cuda = torch.device("cuda")
    budget = 128 * 2048  # tokens of the paper's samples
    # one measured epoch (4.9e12 of work) would stay eager; 15 epochs (7.4e13) compile
    assert decided_for_budget(options, cuda, groups, budget).torch_compile is False
    assert decided_for_budget(options, cuda, groups, 15 * budget).torch_compile is True
    assert decided_for_budget(options, torch.device("cpu"), groups,
                              15 * budget).torch_compile is False
    forced = options.model_copy(update={"torch_compile": False})
    assert decided_for_budget(forced, cuda, groups, 15 * budget).torch_compile is False
