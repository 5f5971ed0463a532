"""
FlatQuant training speed and memory at the shapes of real models: one randomly
initialised decoder layer per shape (bfloat16 weights, as models are loaded), random
tokens, the same steps, targets and training as FlatQuantModifier
(:mod:`flatquant_modifier.calibrate`, without writing the result into the layer).
Reports milliseconds per optimisation step, peak GPU memory, and the projected
training time of the whole model at a budget (default the paper's: 128 x 2048
samples, 15 epochs). Writes JSON, prints a table; not a timed test.

    python benchmarks/scale.py --shapes llama3-8b qwen2.5-7b --num-samples 128 \\
        --seq-len 2048 --epochs 1 --json scale.json

Quality is not measured here (random weights): see the SmolLM2 example.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # profile_layer
from profile_layer import (  # noqa: E402
    kernel_times, layer_inputs, profiled, step_kernel_table, top_operators,
)

from flatquant_modifier.batching import assign_steps, call_keys, plan_steps  # noqa: E402
from flatquant_modifier.calibrate import full_precision_pass  # noqa: E402
from flatquant_modifier.emulation import transformed_weights, use_torch_compile  # noqa: E402
from flatquant_modifier.mappings import LLAMA_MAPPINGS, resolve_layer  # noqa: E402
from flatquant_modifier.modules import build_group_params  # noqa: E402
from flatquant_modifier.options import FlatQuantOptions, training_precision  # noqa: E402
from flatquant_modifier.train import train_layer  # noqa: E402

COMPILE = {"auto": "auto", "on": True, "off": False}

# name -> (transformers config class, config fields, number of decoder layers)
SHAPES = {
    "smollm2-135m": ("LlamaConfig", dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
        num_key_value_heads=3, rope_theta=100000.0), 30),
    "llama3-8b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0), 32),
    "qwen2.5-7b": ("Qwen2Config", dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_attention_heads=28, num_key_value_heads=4, rope_theta=1000000.0), 28),
    "qwen3-32b": ("Qwen3Config", dict(
        vocab_size=151936, hidden_size=5120, intermediate_size=25600,
        num_attention_heads=64, num_key_value_heads=8, head_dim=128,
        rope_theta=1000000.0), 64),
    "llama3-70b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672,
        num_attention_heads=64, num_key_value_heads=8, rope_theta=500000.0), 80),
    # routed experts are not FlatQuant-transformed (vllm-ascend has no FlatQuant MoE
    # method): the attention's transforms are trained, the experts run in the forward
    "qwen3-30b-a3b": ("Qwen3MoeConfig", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        rope_theta=1000000.0), 48),
}


def build_layer_model(shape: str, device: torch.device):
    import transformers

    config_cls, fields, _ = SHAPES[shape]
    config = getattr(transformers, config_cls)(
        **fields, num_hidden_layers=1, max_position_embeddings=8192,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with device:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def measure(shape: str, args, device: torch.device) -> dict:
    model = build_layer_model(shape, device)
    layer, name = model.model.layers[0], "model.layers.0"
    mappings = LLAMA_MAPPINGS if "moe" not in SHAPES[shape][0].lower() else LLAMA_MAPPINGS[:2]
    groups = resolve_layer(name, layer, mappings, ["lm_head"])
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(model.config.vocab_size, (args.num_samples, args.seq_len),
                        generator=generator).to(device)
    calls = layer_inputs(model, layer, ids)
    del model.model.embed_tokens, model.lm_head  # only the layer trains
    steps = plan_steps(calls, *assign_steps(call_keys(calls), args.batch_size))
    targets, act_max = full_precision_pass(layer, steps, groups, device)
    options = FlatQuantOptions(epochs=args.epochs, batch_size=args.batch_size,
                               cuda_graphs=not args.no_cuda_graphs,
                               report_rtn_loss=not args.no_rtn_loss,
                               evaluation_samples=args.evaluation_samples,
                               torch_compile=COMPILE[args.torch_compile],
                               quantized_matmul=COMPILE[args.quantized_matmul])
    options = decided_for_budget(options, device, groups,
                                 args.budget_samples * args.seq_len * args.budget_epochs)
    precision = training_precision(options, layer, device)

    def run(epochs):
        run_options = options.model_copy(update={"epochs": epochs})
        params = build_group_params(groups, act_max, run_options, precision.dtype, device,
                                    torch.Generator().manual_seed(0))
        return train_layer(name, layer, groups, params, steps, targets, run_options,
                           precision, device)

    cuda = device.type == "cuda"
    # warm-up: kernels (the backward's too), compilation, allocator, cuBLAS workspaces
    first = run(1).seconds
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    # epochs E and E + 1 differ by one epoch of steps alone: no evaluation passes, no
    # CUDA graph capture (both runs have them)
    shorter = run(args.epochs)
    start = time.perf_counter()
    report = run(args.epochs + 1)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if args.profile and cuda:  # the kernels of one epoch of steps: 2 epochs minus 1
        profiles = [profiled(lambda e=e: run(e), device)[1] for e in (1, 2)]
        print(step_kernel_table(*map(kernel_times, profiles), len(steps)), flush=True)
    elif args.profile:  # the top operators of a 1-epoch run
        _, prof = profiled(lambda: run(1), device)
        print(top_operators(prof, device, rows=30), flush=True)
    ms_per_step = 1000 * (report.seconds - shorter.seconds) / len(steps)
    # the rest of a layer's time: evaluation passes, graph capture
    overhead = max(shorter.seconds - ms_per_step / 1000 * len(steps) * args.epochs, 0.0)
    layers = SHAPES[shape][2]
    budget_steps = args.budget_samples // args.batch_size
    # per layer: the steps of the budget, plus the evaluation passes scaled to its samples
    per_layer = (ms_per_step / 1000 * budget_steps * args.budget_epochs
                 + overhead * args.budget_samples / args.num_samples)
    return {
        "shape": shape,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "calibration": f"{args.num_samples} x {args.seq_len}",
        "batch_size": args.batch_size,
        "epochs_measured": [args.epochs, args.epochs + 1],
        "cuda_graphs": report.cuda_graphs,
        "report_rtn_loss": options.report_rtn_loss,
        "evaluation_samples": options.evaluation_samples,
        "torch_compile": args.torch_compile,
        "compiled": options.torch_compile,  # "auto" decided for the budget
        "quantized_matmul": args.quantized_matmul,
        "first_layer_seconds": round(first, 2),  # 1 epoch, with compilation and capture
        "ms_per_step": round(ms_per_step, 2),
        "layer_seconds_measured": round(seconds, 2),
        # a layer's time besides its steps (evaluation passes, graph capture), and of
        # it the evaluation passes with their captures
        "overhead_seconds": round(overhead, 2),
        "evaluation_seconds": round(shorter.evaluation_seconds, 2),
        "peak_gpu_GiB": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
        "layers": layers,
        "budget": f"{args.budget_samples} x {args.seq_len}, {args.budget_epochs} epochs",
        "projected_training_minutes": round(per_layer * layers / 60, 1),
        "loss": [report.loss_rtn, report.loss_init, report.loss_final],
    }


def decided_for_budget(options: FlatQuantOptions, device: torch.device, groups,
                       budget_tokens: int) -> FlatQuantOptions:
    """``options`` with ``torch_compile="auto"`` decided as the modifier decides it for
    the budget's training (``budget_tokens``: samples x tokens x epochs), not for the
    shorter runs measured here: a layer that compiles at the budget is measured
    compiled."""
    compiled = use_torch_compile(options, device, transformed_weights(groups), budget_tokens)
    return options.model_copy(update={"torch_compile": compiled})


def table(rows: list[dict]) -> str:
    lines = ["| shape | torch.compile | ms per step | peak GPU memory | layers | "
             "projected training at the budget |", "|---|---|---|---|---|---|"]
    for r in rows:
        compiled = "on" if r["compiled"] else "off"
        lines.append(f"| {r['shape']} | {r['torch_compile']} ({compiled}) | {r['ms_per_step']} | "
                     f"{r['peak_gpu_GiB']} GiB | "
                     f"{r['layers']} | {r['projected_training_minutes']} min ({r['budget']}) |")
    return "\n".join(lines)


def _samples(value: str) -> int | None:
    return None if value == "all" else int(value)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--num-samples", type=int, default=128,
                        help="samples cached for the layer (the peak memory depends on it)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1,
                        help="runs of E and E + 1 epochs are timed; their difference is one "
                        "epoch of steps")
    parser.add_argument("--budget-samples", type=int, default=128)
    parser.add_argument("--budget-epochs", type=int, default=15)
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--no-rtn-loss", action="store_true",
                        help="report_rtn_loss=False: no round-to-nearest evaluation pass")
    parser.add_argument("--evaluation-samples", type=_samples,
                        default=FlatQuantOptions.model_fields["evaluation_samples"].default,
                        help="FlatQuantOptions.evaluation_samples: the samples of the "
                        "evaluation passes ('all': every sample)")
    parser.add_argument("--torch-compile", choices=sorted(COMPILE), default="auto",
                        help="FlatQuantOptions.torch_compile ('auto': decided for the "
                        "budget's training, as the modifier decides it)")
    parser.add_argument("--quantized-matmul", choices=sorted(COMPILE), default="auto",
                        help="FlatQuantOptions.quantized_matmul: the linears' forward as "
                        "FP8 (GPU) or int8 GEMMs of the quantized levels")
    parser.add_argument("--profile", action="store_true",
                        help="print the GPU kernel time per step of one epoch of "
                        "training steps (a 2-epoch run's profile minus a 1-epoch run's), "
                        "by category and kernel; on a CPU the top operators of a run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu only checks that the script runs (small shapes)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    rows = []
    for shape in args.shapes:
        rows.append(measure(shape, args, device))
        print(json.dumps(rows[-1]), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.json is not None:
            args.json.write_text(json.dumps(rows, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
