"""
Where the calibration time goes: train one decoder layer of SmolLM2-135M-Instruct the
way FlatQuantModifier does, report milliseconds per optimisation step, and optionally
the top operators (torch.profiler) and the host/device syncs per step.

    python benchmarks/profile_layer.py --device cuda --num-samples 16 --seq-len 2048 \
        [--layer 10] [--epochs 2] [--profile] [--sync-debug] [--json out.json]
"""

import argparse
import json
import time
from pathlib import Path

import torch

from flatquant_modifier.batching import assign_steps, call_keys, plan_steps
from flatquant_modifier.calibration_data import text_windows_dataset
from flatquant_modifier.mappings import infer_mappings_from_model, resolve_layer
from flatquant_modifier.modifier import _full_precision_pass
from flatquant_modifier.smollm2 import load_smollm2
from flatquant_modifier.train import TrainConfig, build_group_params, train_layer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def layer_inputs(model, layer, input_ids: torch.Tensor) -> list[dict]:
    """The keyword arguments of ``layer`` for each sample (one forward per sample)."""
    calls = []

    def capture(_module, args, kwargs):
        call = dict(kwargs)
        if args:
            call["hidden_states"] = args[0]
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--autocast", choices=["bfloat16", "float16"], default=None)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--sync-debug", action="store_true")
    parser.add_argument("--calib-data", default=str(DATA / "wikitext2-valid.txt"))
    parser.add_argument("--model-cache", default=str(ROOT / "outputs" / "smollm2-hf"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    model, tokenizer = load_smollm2(args.model_cache)
    model.to(device).eval()
    dataset = text_windows_dataset(tokenizer, args.calib_data, args.num_samples, args.seq_len)
    input_ids = torch.tensor(dataset["input_ids"], device=device)
    name = f"model.layers.{args.layer}"
    layer = model.model.layers[args.layer]
    groups = resolve_layer(name, layer, infer_mappings_from_model(model), ["lm_head"])
    calls = layer_inputs(model, layer, input_ids)
    steps = plan_steps(calls, *assign_steps(call_keys(calls), args.batch_size))
    targets, act_max = _full_precision_pass(layer, steps, groups, device)
    config = TrainConfig(
        epochs=args.epochs,
        autocast_dtype=getattr(torch, args.autocast) if args.autocast else None,
    )

    def run():
        params = build_group_params(
            groups, act_max, config, device, torch.Generator().manual_seed(0)
        )
        original = {k: v.clone() for k, v in layer.state_dict().items()}
        try:
            return train_layer(name, layer, groups, params, steps, targets, config, device)
        finally:
            layer.load_state_dict(original)

    run()  # warm-up (kernels, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if args.sync_debug and device.type == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
    start = time.perf_counter()
    if args.profile:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            report = run()
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
        "seconds": round(seconds, 3),
        "ms_per_training_step_upper_bound": round(1000 * seconds / passes, 2),
        "loss": [report.loss_init, report.loss_final],
    }
    if device.type == "cuda":
        result["peak_gpu_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    print(json.dumps(result))
    if args.profile:
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=25))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
