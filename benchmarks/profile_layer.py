"""
Where the calibration time goes: train one decoder layer of SmolLM2-135M-Instruct the
way FlatQuantModifier does, report milliseconds per optimisation step, and optionally
the top operators (torch.profiler) and the host/device syncs per step.

    python benchmarks/profile_layer.py --device cuda --num-samples 16 --seq-len 2048 \
        [--layer 10] [--epochs 2] [--profile] [--sync-debug] [--json out.json]

``--random-model`` uses a randomly initialised model of SmolLM2-135M's shapes and
random tokens instead (no GGUF, no data files: for a GPU machine that has neither);
the timings are those of the real model, the losses are not.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from flatquant_modifier.batching import assign_steps, call_keys, plan_steps
from flatquant_modifier.calibrate import full_precision_pass
from flatquant_modifier.mappings import infer_mappings_from_model, resolve_layer
from flatquant_modifier.modules import build_group_params
from flatquant_modifier.options import FlatQuantOptions, training_precision
from flatquant_modifier.train import train_layer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # examples.common, wherever this script is run from
from examples.common.data import CALIBRATION_TEXT, text_windows_dataset  # noqa: E402
from examples.common.smollm2 import load_smollm2  # noqa: E402


def layer_inputs(model, layer, input_ids: torch.Tensor) -> list[dict]:
    """The keyword arguments of ``layer`` for each sample (one forward per sample)."""
    calls = []

    def capture(_module, args, kwargs):
        # the layer input first, as llm-compressor's pipeline caches a call
        call = {"hidden_states": args[0], **kwargs} if args else dict(kwargs)
        call.pop("past_key_values", None)
        calls.append({k: (v.detach() if isinstance(v, torch.Tensor) else v)
                      for k, v in call.items()})
        raise StopIteration  # nothing after this layer is needed

    handle = layer.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in input_ids:
                try:
                    model(ids.unsqueeze(0))
                except StopIteration:
                    pass
    finally:
        handle.remove()
    return calls


def profiled(fn, device: torch.device):
    """``fn()`` under torch.profiler (CPU operators, and the GPU kernels on CUDA);
    returns its result and the profile."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        result = fn()
    return result, prof


def top_operators(prof, device: torch.device, rows: int) -> str:
    """The profile's top GPU kernels (CPU operators on a CPU), as a table."""
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=70)


# kernel name fragments -> category, first match wins (cuBLAS/cuDNN/Triton kernel names)
KERNEL_CATEGORIES = (
    (("flash", "fmha", "sdpa", "attention"), "attention"),
    (("triton",), "compiled (Triton)"),
    (("gemm", "cutlass", "nvjet", "xmma", "cublas"), "GEMM"),
    # dtype casts are copy kernels; "cast" alone would also take the eager elementwise
    # kernels named ``gpu_kernel_impl_nocast``
    (("copy", "memcpy"), "copies and casts"),
    (("elementwise", "vectorized"), "eager elementwise"),
    (("reduce",), "eager reductions"),
)


def kernel_category(name: str) -> str:
    lower = name.lower()
    return next((cat for keys, cat in KERNEL_CATEGORIES if any(k in lower for k in keys)),
                "other")


def kernel_times(prof) -> dict[str, tuple[float, int]]:
    """GPU time (microseconds) and launches per kernel name of a CUDA profile."""
    times: dict[str, tuple[float, int]] = {}
    for event in prof.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        total = getattr(event, "device_time_total", None)
        if total is None:
            total = event.cuda_time_total
        micros, count = times.get(event.key, (0.0, 0))
        times[event.key] = (micros + total, count + event.count)
    return times


def step_kernel_table(shorter: dict, longer: dict, steps: int, rows: int = 25) -> str:
    """
    GPU time per step of the kernels one run has beyond another (:func:`kernel_times`
    of both), e.g. a 2-epoch run minus a 1-epoch run: one epoch of training steps,
    without the evaluation passes and graph captures both runs have. By category, then
    the ``rows`` largest kernels.
    """
    delta = {}
    for name, (t, n) in longer.items():
        t0, n0 = shorter.get(name, (0.0, 0))
        delta[name] = (t - t0, n - n0)
    total = sum(t for t, _ in delta.values())
    per_step = lambda us: us / max(steps, 1) / 1000  # noqa: E731  (ms)
    categories: dict[str, float] = {}
    for name, (t, _) in delta.items():
        category = kernel_category(name)
        categories[category] = categories.get(category, 0.0) + t
    lines = [f"GPU kernel time per step: {per_step(total):.2f} ms", "",
             "| kernels | ms per step | share |", "|---|---|---|"]
    for cat, t in sorted(categories.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {cat} | {per_step(t):.2f} | {100 * t / max(total, 1e-9):.1f} % |")
    lines += ["", "| ms per step | launches per step | kernel |", "|---|---|---|"]
    for name, (t, n) in sorted(delta.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"| {per_step(t):.3f} | {n / max(steps, 1):.1f} | {name[:120]} |")
    return "\n".join(lines)


def random_smollm2(num_layers: int):
    """A randomly initialised Llama with SmolLM2-135M-Instruct's shapes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=num_layers, num_attention_heads=9, num_key_value_heads=3,
        max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--autocast", choices=["bfloat16", "float16", "float32"], default=None,
                        help="default: as FlatQuantModifier's 'auto' (bfloat16 on CUDA)")
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--tf32", action="store_true", help="TF32 float32 matmuls")
    parser.add_argument("--torch-compile", choices=["auto", "on", "off"], default="auto",
                        help="FlatQuantModifier's torch_compile (auto: its own choice)")
    parser.add_argument("--evaluation-samples", type=int, default=32,
                        help="FlatQuantModifier's evaluation_samples")
    parser.add_argument("--no-rtn-report", action="store_true",
                        help="report_rtn_loss=False (no round-to-nearest evaluation pass)")
    parser.add_argument("--random-model", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--sync-debug", action="store_true")
    parser.add_argument("--calib-data", default=str(CALIBRATION_TEXT))
    parser.add_argument("--model-cache", default=str(ROOT / "outputs" / "smollm2-hf"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.random_model:
        model = random_smollm2(args.layer + 1)
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(
            model.config.vocab_size, (args.num_samples, args.seq_len), generator=generator
        ).to(device)
        model.to(device).eval()
    else:
        model, tokenizer = load_smollm2(args.model_cache)
        model.to(device).eval()
        dataset = text_windows_dataset(
            tokenizer, args.calib_data, args.num_samples, args.seq_len
        )
        input_ids = torch.tensor(dataset["input_ids"], device=device)
    name = f"model.layers.{args.layer}"
    layer = model.model.layers[args.layer]
    groups = resolve_layer(name, layer, infer_mappings_from_model(model), ["lm_head"])
    calls = layer_inputs(model, layer, input_ids)
    steps = plan_steps(calls, *assign_steps(call_keys(calls), args.batch_size))
    # the parts of flatquant_modifier.calibrate.calibrate_layer that train, without
    # the pipeline and without writing the result into the layer
    targets, act_max = full_precision_pass(layer, steps, groups, device)
    if args.autocast is None:
        args.autocast = "bfloat16" if device.type == "cuda" else "float32"
    options = FlatQuantOptions(
        epochs=args.epochs,
        autocast_dtype=None if args.autocast == "float32" else getattr(torch, args.autocast),
        cuda_graphs=not args.no_cuda_graphs,
        torch_compile={"auto": "auto", "on": True, "off": False}[args.torch_compile],
        evaluation_samples=args.evaluation_samples,
        report_rtn_loss=not args.no_rtn_report,
    )
    precision = training_precision(options, layer, device)

    def run(epochs=args.epochs):
        run_options = options.model_copy(update={"epochs": epochs})
        params = build_group_params(
            groups, act_max, run_options, precision.dtype, device,
            torch.Generator().manual_seed(0),
        )
        return train_layer(name, layer, groups, params, steps, targets, run_options,
                           precision, device)

    run()  # warm-up (kernels, allocator)
    # the same without training steps: the time of the evaluation passes and captures
    overhead = run(0).seconds
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if args.sync_debug and device.type == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
    start = time.perf_counter()
    if args.profile:
        report, prof = profiled(run, device)
    else:
        report = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(0)
    seconds = time.perf_counter() - start
    # three evaluation passes (round-to-nearest, initial, final) + the training steps
    passes = len(steps) * (args.epochs + 1)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "layer": name,
        "calibration": f"{args.num_samples} x {args.seq_len}",
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "autocast": args.autocast,
        "cuda_graphs": not args.no_cuda_graphs,
        "tf32": args.tf32,
        "random_model": args.random_model,
        "seconds": round(seconds, 3),
        "ms_per_training_step_upper_bound": round(1000 * seconds / passes, 2),
        # (train_layer's time - its time with 0 epochs) / training steps
        "ms_per_training_step": round(
            1000 * (report.seconds - overhead) / max(args.epochs * len(steps), 1), 2
        ),
        "cuda_graphs_captured": report.cuda_graphs,
        "loss": [report.loss_init, report.loss_final],
    }
    if device.type == "cuda":
        result["peak_gpu_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    print(json.dumps(result))
    if args.profile:
        print(top_operators(prof, device, rows=25))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
