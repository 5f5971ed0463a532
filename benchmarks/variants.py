"""
Compare FlatQuantModifier variants (parametrisation, init, smoothing, ...) on
SmolLM2-135M-Instruct: WikiText-2 test perplexity, calibration time, peak memory.
Writes a JSON result and prints a Markdown table; not a timed test.

    python benchmarks/variants.py --variants orthogonal,dense --num-samples 32 \
        --seq-len 512 --out outputs/variants.json
"""

import argparse
import json
import sys
import resource
import time
from pathlib import Path

import torch
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier

from flatquant_modifier import FlatQuantModifier

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # examples.common, wherever this script is run from
from examples.common.data import CALIBRATION_TEXT, TEST_TEXT, text_windows_dataset  # noqa: E402
from examples.common.perplexity import perplexity  # noqa: E402
from examples.common.smollm2 import load_smollm2  # noqa: E402

VARIANTS = {  # changes from the defaults (dense, random init, smoothing, both clips)
    "rtn": None,  # no FlatQuantModifier: the weight/activation scheme alone
    "default": {},
    "dense-identity-init": {"transform_init": "identity"},
    "no-smooth": {"smooth": False},
    "no-clip": {"learn_weight_clip": False, "learn_activation_clip": False},
    "bf16-autocast": {"autocast_dtype": "bfloat16"},
    "propagate-act-quant": {"propagate_activation_quant": True},
    "orthogonal-random-init": {"parametrization": "orthogonal", "transform_init": "random"},
    "orthogonal-identity-init": {"parametrization": "orthogonal", "transform_init": "identity"},
}

W4_CHANNEL = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel",
              "observer": "minmax"}
A4_TOKEN = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "token",
            "dynamic": True}


def quantizer(scheme: str, flatquant: bool) -> QuantizationModifier:
    """The weight (and activation) quantizer after FlatQuant, or alone for "rtn"."""
    if scheme == "nvfp4":
        return QuantizationModifier(targets=["Linear"], scheme="NVFP4", ignore=["lm_head"])
    group = {"targets": ["Linear"], "weights": W4_CHANNEL}
    if not flatquant:  # FlatQuant's transform quantizes the activations itself
        group["input_activations"] = A4_TOKEN
    return QuantizationModifier(ignore=["lm_head"], config_groups={"group_0": group})


def run_variant(name, kwargs, args, tokenizer, dataset, device):
    model, _ = load_smollm2(args.model_cache)
    model.to(device)
    recipe = [quantizer(args.scheme, kwargs is not None)]
    if kwargs is not None:
        if args.scheme == "nvfp4":
            kwargs = {**kwargs, "quant_format": "nvfp4"}
        recipe.insert(0, FlatQuantModifier(epochs=args.epochs, **kwargs))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    start = time.perf_counter()
    oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe,
            num_calibration_samples=args.num_samples, max_seq_length=args.seq_len)
    seconds = time.perf_counter() - start
    row = {
        "variant": name,
        "kwargs": kwargs,
        "calibration_seconds": round(seconds, 1),
        "ppl": round(perplexity(model, tokenizer, TEST_TEXT,
                                2048, args.eval_windows or None), 3),
    }
    if kwargs is not None:
        reports = recipe[0].reports
        row["mean_final_layer_loss"] = sum(r.loss_final for r in reports) / len(reports)
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
    parser.add_argument("--scheme", choices=["w4a4", "nvfp4"], default="w4a4",
                        help="w4a4: int4 channel weights + Ascend A4 (FlatQuant) or "
                        "int4 per-token activations (rtn); nvfp4: llm-compressor NVFP4")
    parser.add_argument("--eval-windows", type=int, default=8, help="0: all")
    parser.add_argument("--model-cache", default=str(ROOT / "outputs" / "smollm2-hf"))
    parser.add_argument("--out", default=str(ROOT / "outputs" / "variants.json"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, tokenizer = load_smollm2(args.model_cache)
    dataset = text_windows_dataset(tokenizer, CALIBRATION_TEXT,
                                   args.num_samples, args.seq_len, seed=0)
    rows = []
    for name in args.variants.split(","):
        rows.append(run_variant(name, VARIANTS[name], args, tokenizer, dataset, device))
        print(json.dumps(rows[-1]), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "budget": f"{args.num_samples} x {args.seq_len}, {args.epochs} epochs",
            "scheme": args.scheme,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "eval_windows": args.eval_windows, "rows": rows}, indent=2))
    print(f"\n| variant | ppl ({args.eval_windows or 'all'} windows) | calib s | peak |")
    print("|---|---|---|---|")
    for r in rows:
        peak = r.get("peak_gpu_GiB", r["peak_rss_GiB"])
        print(f"| {r['variant']} | {r['ppl']:.2f} | {r['calibration_seconds']} | {peak} GiB |")


if __name__ == "__main__":
    main()
