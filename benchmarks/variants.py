"""
Compare FlatQuantModifier variants (parametrisation, init, smoothing, training
schedule, loss, the weight quantizer after it) on SmolLM2-135M-Instruct: WikiText-2
test perplexity, calibration time, peak memory, for one or more seeds (FlatQuant's
initialisation and the calibration windows). Writes a JSON result and prints a
Markdown table (mean and range over the seeds); not a timed test.

    python benchmarks/variants.py --variants default,relative-loss,gptq \
        --num-samples 128 --seq-len 2048 --eval-windows 8,0 --seeds 0,1

``--scheme mxfp4`` trains for vllm-ascend's W4A4_MXFP4_FLATQUANT (MXFP4 weights from
compressed-tensors' scheme, the NPU's MX activation quantizer in the transform); its
``rtn`` is the same model with identity transforms and no training (what the NPU
computes without FlatQuant).
"""

import argparse
import json
import os
import sys
import resource
import time
from pathlib import Path

import torch
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

from flatquant_modifier import FlatQuantModifier

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # examples.common, wherever this script is run from
from examples.common.data import CALIBRATION_TEXT, TEST_TEXT, text_windows_dataset  # noqa: E402
from examples.common.perplexity import perplexity  # noqa: E402
from examples.common.smollm2 import load_smollm2  # noqa: E402

VARIANTS = {  # changes from the defaults (dense, random init, smoothing, both clips)
    "rtn": None,  # no FlatQuantModifier: the weight/activation scheme alone
    "default": {},
    # training schedule and loss (the paper's code: AdamW, its default weight decay
    # 0.01, cosine annealing, 15 epochs, lr 5e-3, layer-output MSE)
    "epochs-8": {"epochs": 8},
    "epochs-30": {"epochs": 30},
    "lr-2.5e-3": {"lr": 2.5e-3},
    "lr-1e-2": {"lr": 1e-2},
    "lr-2e-2": {"lr": 2e-2, "clip_lr": 2e-1},  # both rates 4x
    "epochs-5-lr-2e-2": {"epochs": 5, "lr": 2e-2, "clip_lr": 2e-1},  # a third of the steps
    "constant-lr": {"lr_schedule": "constant"},
    "weight-decay-0.01": {"weight_decay": 0.01},
    "relative-loss": {"loss": "relative"},
    "lr-2e-2-last-layer-logits": {"lr": 2e-2, "clip_lr": 2e-1, "last_layer_loss": "logits"},
    "lr-2e-2-model-targets": {"lr": 2e-2, "clip_lr": 2e-1, "target_outputs": "model"},
    "dense-identity-init": {"transform_init": "identity"},
    "hadamard-init": {"transform_init": "hadamard"},
    "lr-2e-2-hadamard-init": {"lr": 2e-2, "clip_lr": 2e-1, "transform_init": "hadamard"},
    "no-smooth": {"smooth": False},
    "no-clip": {"learn_weight_clip": False, "learn_activation_clip": False},
    "bf16-autocast": {"autocast_dtype": "bfloat16"},
    # compiled / eager quantizers (SmolLM2's layers are below "auto"'s size: eager)
    "torch-compile": {"torch_compile": True},
    "no-torch-compile": {"torch_compile": False},
    "propagate-act-quant": {"propagate_activation_quant": True},
    # flatquant_w4a4.yaml with the training forward's GEMMs on the quantized levels
    # (FP8 on GPUs with FP8 tensor cores): its quality against "lr-2e-2"
    "lr-2e-2-quantized-matmul": {"lr": 2e-2, "clip_lr": 2e-1, "quantized_matmul": True},
    # flatquant_w4a4.yaml with 8 samples a step: half the steps of the same epochs (on one
    # H200 SmolLM2's small GEMMs hardly slow down with the batch)
    "lr-2e-2-batch-8": {"lr": 2e-2, "clip_lr": 2e-1, "batch_size": 8},
    "orthogonal-random-init": {"parametrization": "orthogonal", "transform_init": "random"},
    "orthogonal-identity-init": {"parametrization": "orthogonal", "transform_init": "identity"},
}

# GPTQ instead of round-to-nearest weights after FlatQuant: (changes of FlatQuant's
# defaults, GPTQModifier options changed from llm-compressor's defaults: block 128,
# dampening 0.01, static activation order; "observer": the weights' observer)
def gptq_yaml(gptq: dict | None = None, **flatquant) -> tuple[dict, dict]:
    """The GPTQ recipe the variants below change (FlatQuant at lr 2e-2, clip_lr 2e-1,
    15 epochs, target_outputs "model"; GPTQ with the memoryless-mse observer, dampening
    0.01: recipes/flatquant_w4a4_gptq.yaml before it took the best two changes, 25
    epochs and dampening 0.1) with FlatQuant's options ``flatquant`` and GPTQ's
    ``gptq`` changed, as a GPTQ_VARIANTS entry."""
    return ({"lr": 2e-2, "clip_lr": 2e-1, "target_outputs": "model", **flatquant},
            {"observer": "memoryless-mse", **(gptq or {})})


GPTQ_VARIANTS = {
    "gptq": ({}, {}),
    "gptq-no-actorder": ({}, {"actorder": None}),
    "gptq-damp-0.1": ({}, {"dampening_frac": 0.1}),
    "gptq-mse-observer": ({}, {"observer": "memoryless-mse"}),
    "relative-loss-gptq": ({"loss": "relative"}, {}),
    "lr-1e-2-gptq-mse": ({"lr": 1e-2}, {"observer": "memoryless-mse"}),
    "lr-2e-2-gptq-mse": ({"lr": 2e-2, "clip_lr": 2e-1}, {"observer": "memoryless-mse"}),
    "epochs-5-lr-2e-2-gptq-mse": ({"epochs": 5, "lr": 2e-2, "clip_lr": 2e-1},
                                  {"observer": "memoryless-mse"}),
    "lr-2e-2-last-layer-logits-gptq-mse": (
        {"lr": 2e-2, "clip_lr": 2e-1, "last_layer_loss": "logits"},
        {"observer": "memoryless-mse"}),
    "lr-2e-2-model-targets-gptq-mse": gptq_yaml(),
    "lr-2e-2-model-targets-logits-gptq-mse": gptq_yaml(last_layer_loss="logits"),
    "lr-3e-2-model-targets-gptq-mse": gptq_yaml(lr=3e-2, clip_lr=3e-1),
    "epochs-25-lr-2e-2-model-targets-gptq-mse": gptq_yaml(epochs=25),
    # gptq_yaml()'s recipe with GPTQ's dampening or activation order changed
    "lr-2e-2-model-targets-gptq-mse-damp-0.1": gptq_yaml({"dampening_frac": 0.1}),
    "lr-2e-2-model-targets-gptq-mse-no-actorder": gptq_yaml({"actorder": None}),
    # the two best single changes together, 25 epochs and GPTQ's dampening 0.1:
    # recipes/flatquant_w4a4_gptq.yaml
    "epochs-25-lr-2e-2-model-targets-gptq-mse-damp-0.1": gptq_yaml(
        {"dampening_frac": 0.1}, epochs=25),
    # the same without the learned weight clipping (absorbed as a clamp of the weights,
    # which GPTQ cannot undo), or trained without weight quantization at all
    "lr-2e-2-model-targets-no-weight-clip-gptq-mse": gptq_yaml(learn_weight_clip=False),
    # gptq_yaml()'s recipe with random Hadamard transform factors to start from
    "lr-2e-2-model-targets-hadamard-init-gptq-mse": gptq_yaml(transform_init="hadamard"),
    # gptq_yaml()'s recipe with the smoothing's starting strength (SmoothQuant's
    # alpha, 0.3), the clip factors' starting logit (4: sigmoid 0.98) or the steps'
    # samples (4) changed
    "lr-2e-2-model-targets-smooth-0.15-gptq-mse": gptq_yaml(smooth_alpha=0.15),
    "lr-2e-2-model-targets-smooth-0.5-gptq-mse": gptq_yaml(smooth_alpha=0.5),
    "lr-2e-2-model-targets-clip-init-2-gptq-mse": gptq_yaml(clip_init_logit=2.0),
    "lr-2e-2-model-targets-batch-2-gptq-mse": gptq_yaml(batch_size=2),
    "lr-2e-2-model-targets-batch-8-gptq-mse": gptq_yaml(batch_size=8),
    "lr-2e-2-model-targets-no-weight-quant-gptq-mse": gptq_yaml(
        w_bits=None, learn_weight_clip=False),
    # gptq_yaml()'s recipe with a linear warmup over the first 10 % of each layer's
    # steps: alone, and with the 1.5x rates at which one seed's layer 0 diverged without
    "lr-2e-2-warmup-0.1-model-targets-gptq-mse": gptq_yaml(lr_warmup=0.1),
    "lr-3e-2-warmup-0.1-model-targets-gptq-mse": gptq_yaml(lr=3e-2, clip_lr=3e-1,
                                                           lr_warmup=0.1),
}

W4_CHANNEL = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel",
              "observer": "minmax"}
A4_TOKEN = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "token",
            "dynamic": True}


# MXFP4 without FlatQuant: identity transforms, no smoothing, no clipping, no training;
# the transform then only runs the NPU's MX activation quantizer
MXFP4_RTN = {"epochs": 0, "transform_init": "identity", "smooth": False,
             "learn_weight_clip": False}


def quantizer(scheme: str, flatquant: bool, gptq: dict | None = None):
    """
    The weight (and activation) quantizer after FlatQuant, or alone for "rtn";
    ``gptq``: GPTQModifier's options (``observer``: the weights' observer) for GPTQ
    weights instead of round-to-nearest.
    """
    if gptq is not None:
        if scheme != "w4a4":
            raise SystemExit("GPTQ variants are for --scheme w4a4")
        gptq = dict(gptq)
        weights = {**W4_CHANNEL, "observer": gptq.pop("observer", "minmax")}
        return GPTQModifier(ignore=["lm_head"], config_groups={
            "group_0": {"targets": ["Linear"], "weights": weights}}, **gptq)
    if scheme == "nvfp4":
        return QuantizationModifier(targets=["Linear"], scheme="NVFP4", ignore=["lm_head"])
    if scheme == "mxfp4":
        return QuantizationModifier(targets=["Linear"], scheme="MXFP4A16", ignore=["lm_head"])
    group = {"targets": ["Linear"], "weights": W4_CHANNEL}
    if not flatquant:  # FlatQuant's transform quantizes the activations itself
        group["input_activations"] = A4_TOKEN
    return QuantizationModifier(ignore=["lm_head"], config_groups={"group_0": group})


def run_variant(name, args, seed, tokenizer, dataset, device):
    kwargs, gptq = GPTQ_VARIANTS.get(name, (VARIANTS.get(name), None))
    model, _ = load_smollm2(args.model_cache, dtype=getattr(torch, args.dtype))
    model.to(device)
    if args.scheme == "mxfp4":
        kwargs = {"epochs": args.epochs, "seed": seed,
                  **(MXFP4_RTN if kwargs is None else kwargs),
                  "quant_format": "mxfp4", "max_supported_tp": args.max_supported_tp}
    elif kwargs is not None:
        kwargs = {"epochs": args.epochs, "seed": seed, **kwargs}
        if args.scheme == "nvfp4":
            kwargs["quant_format"] = "nvfp4"
    if kwargs is not None and args.deterministic:
        kwargs["deterministic"] = True
    if kwargs is not None and args.torch_compile != "variant":
        choice = {"auto": "auto", "on": True, "off": False}[args.torch_compile]
        kwargs["torch_compile"] = choice
    recipe = [quantizer(args.scheme, kwargs is not None, gptq)]
    if kwargs is not None:
        recipe.insert(0, FlatQuantModifier(**kwargs))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    start = time.perf_counter()
    # the model is on ``device``: the pipeline's layer inputs stay there too instead of
    # going to the CPU and back for every layer and pass (as in the example)
    oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe,
            num_calibration_samples=args.num_samples, max_seq_length=args.seq_len,
            batch_size=args.calib_batch_size, sequential_offload_device=str(device),
            pipeline=args.pipeline)
    seconds = time.perf_counter() - start
    row = {
        "variant": name,
        "seed": seed,
        "kwargs": kwargs,
        "gptq": gptq,
        "calibration_seconds": round(seconds, 1),
        "calib_batch_size": args.calib_batch_size,
        "dtype": args.dtype,
        "pipeline": args.pipeline,
    }
    for windows in args.eval_windows:
        row[f"ppl_{windows or 'all'}"] = round(
            perplexity(model, tokenizer, TEST_TEXT, 2048, windows or None), 3)
    row["ppl"] = row[f"ppl_{args.eval_windows[0] or 'all'}"]
    if kwargs is not None and recipe[0].reports:
        reports = recipe[0].reports
        # (measured on the modifier's evaluation_samples, not on every sample)
        row["mean_final_layer_loss"] = sum(r.loss_final for r in reports) / len(reports)
        row["evaluation_samples"] = recipe[0].evaluation_samples
        row["flatquant_seconds"] = round(sum(r.seconds for r in reports), 1)
        row["training_epochs_seconds"] = round(
            sum(sum(r.epoch_seconds) for r in reports), 1)
        row["evaluation_seconds"] = round(sum(r.evaluation_seconds for r in reports), 1)
    if device.type == "cuda":
        row["peak_gpu_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    row["peak_rss_GiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="default,orthogonal-random-init")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--calib-batch-size", type=int, default=None,
                        help="oneshot's batch_size: samples per layer call of "
                        "llm-compressor's passes (FlatQuant's steps stay the same); "
                        "default 8 on a GPU, 1 on the CPU")
    parser.add_argument("--pipeline", choices=["independent", "sequential"],
                        default="independent",
                        help="oneshot's pipeline: one pass per modifier (llm-compressor's "
                        "default), or one pass shared by FlatQuant and a GPTQ after it "
                        "(GPTQ's Hessians gathered after each layer's transforms)")
    parser.add_argument("--seeds", default="0",
                        help="comma-separated seeds of FlatQuant and of the calibration "
                        "windows; every variant runs once per seed")
    parser.add_argument("--scheme", choices=["w4a4", "nvfp4", "mxfp4"], default="w4a4",
                        help="w4a4: int4 channel weights + Ascend A4 (FlatQuant) or "
                        "int4 per-token activations (rtn); nvfp4: llm-compressor NVFP4; "
                        "mxfp4: vllm-ascend's W4A4_MXFP4_FLATQUANT")
    parser.add_argument("--max-supported-tp", type=int, default=1,
                        help="mxfp4: FlatQuant's max_supported_tp (SmolLM2's 576 inputs "
                        "of o_proj split into 64-multiples at 1 only)")
    parser.add_argument("--deterministic", action="store_true",
                        help="FlatQuant trains with deterministic algorithms "
                        "(FlatQuantModifier's deterministic): variants on the same seed "
                        "then differ by their change, not by GPU run-to-run noise")
    parser.add_argument("--torch-compile", choices=["variant", "auto", "on", "off"],
                        default="variant",
                        help="FlatQuant's torch_compile for every variant (default: the "
                        "variant's own, else \"auto\")")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the model's dtype (the layer passes, the targets and the "
                        "perplexity run in it; FlatQuant trains in its autocast)")
    parser.add_argument("--eval-windows", default="8",
                        help="comma-separated numbers of test windows, 0: all (e.g. 8,0)")
    parser.add_argument("--model-cache", default=str(ROOT / "outputs" / "smollm2-hf"))
    parser.add_argument("--out", default=str(ROOT / "outputs" / "variants.json"))
    args = parser.parse_args()
    args.eval_windows = [int(w) for w in args.eval_windows.split(",")]
    if args.deterministic:  # before cuBLAS starts, for runs equal across processes
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.calib_batch_size is None:
        args.calib_batch_size = 8 if device.type == "cuda" else 1
    _, tokenizer = load_smollm2(args.model_cache)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS and n not in GPTQ_VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from "
                         f"{sorted(VARIANTS) + sorted(GPTQ_VARIANTS)}")
    rows = []
    for seed in seeds:
        dataset = text_windows_dataset(tokenizer, CALIBRATION_TEXT,
                                       args.num_samples, args.seq_len, seed=seed)
        for name in names:
            rows.append(run_variant(name, args, seed, tokenizer, dataset, device))
            print(json.dumps(rows[-1]), flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({
                "budget": f"{args.num_samples} x {args.seq_len}, {args.epochs} epochs",
                "seeds": seeds,
                "scheme": args.scheme,
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "eval_windows": args.eval_windows, "rows": rows}, indent=2))
    print("\n" + table(rows, [f"ppl_{w or 'all'}" for w in args.eval_windows]))


def table(rows: list[dict], keys: list[str]) -> str:
    """Markdown, one line per variant: mean [min-max] over its seeds."""
    lines = [f"| variant | seeds | {' | '.join(keys)} | calib s | peak |",
             "|---|---|" + "---|" * len(keys) + "---|---|"]
    for name in dict.fromkeys(r["variant"] for r in rows):
        runs = [r for r in rows if r["variant"] == name]
        cells = []
        for key in keys:
            values = [r[key] for r in runs]
            mean = sum(values) / len(values)
            cells.append(f"{mean:.2f}" if len(values) == 1
                         else f"{mean:.2f} [{min(values):.2f}-{max(values):.2f}]")
        seconds = sum(r["calibration_seconds"] for r in runs) / len(runs)
        peak = max(r["peak_gpu_GiB"] if "peak_gpu_GiB" in r else r["peak_rss_GiB"]
                   for r in runs)
        seeds = ",".join(str(r["seed"]) for r in runs)
        lines.append(
            f"| {name} | {seeds} | {' | '.join(cells)} | {seconds:.1f} | {peak} GiB |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
