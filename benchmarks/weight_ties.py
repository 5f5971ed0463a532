"""
How much the ties of the int4 weight formula cost on SmolLM2-135M-Instruct. The
symmetric formula ``scale = amax / 7.5`` (compressed-tensors') puts a row's negative
extreme at exactly -7.5 levels, and FlatQuant's clip, baked in as a clamp at
``-c * amax``, puts every clipped weight there. Training takes them to -8; in the saved
model round-half-to-even takes each to -8 or -7 depending on the last bit of the division.
This runs a recipe with ``oneshot``, then reports how many weights landed on -7 and the
perplexity as saved and with those weights set to -8, as trained. Writes JSON, prints a
table; not a timed test.

    python benchmarks/weight_ties.py --recipe recipes/flatquant_w4a4_fast.yaml \\
        --num-samples 32 --seq-len 512 --eval-windows 8
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from llmcompressor import oneshot
from llmcompressor.recipe import Recipe

import flatquant_modifier  # noqa: F401  registers FlatQuantModifier for YAML recipes
from flatquant_modifier import FlatQuantModifier

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # examples.common, wherever this script is run from
from examples.common.autocast import bfloat16_on_native_cpus  # noqa: E402
from examples.common.data import CALIBRATION_TEXT, TEST_TEXT, text_windows_dataset  # noqa: E402
from examples.common.perplexity import perplexity  # noqa: E402
from examples.common.smollm2 import load_smollm2  # noqa: E402

TIE = -7.5  # the negative extreme of a row, in levels, under scale = amax / 7.5


def tied_low(weight: torch.Tensor, scale: torch.Tensor, tol: float = 1e-4) -> torch.Tensor:
    """Weights a hair above -7.5 levels (within ``tol``): round-half-to-even makes them -7
    where the exact tie, and training, give -8."""
    levels = weight / scale
    return (levels > TIE) & (levels < TIE + tol)


def at_tie(weight: torch.Tensor, scale: torch.Tensor, tol: float = 1e-4) -> torch.Tensor:
    """Rows whose minimum lies at -7.5 levels (within ``tol``), on either side."""
    return ((weight / scale).amin(dim=-1) - TIE).abs() < tol


@torch.no_grad()
def send_to_minus_eight(weight: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor):
    """Move the masked weights just below -7.5 levels, so that they round to -8."""
    weight[mask] = (TIE * (1 + 1e-6) * scale.expand_as(weight))[mask]


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes/flatquant_w4a4_fast.yaml")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8, help="0: all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model-cache", default=str(ROOT / "outputs" / "smollm2-hf"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model, tokenizer = load_smollm2(args.model_cache)
    model.to(device)
    recipe = Recipe.create_instance(str(args.recipe))
    for modifier in recipe.modifiers:  # as the example
        if isinstance(modifier, FlatQuantModifier):
            bfloat16_on_native_cpus(modifier, device)
    dataset = text_windows_dataset(tokenizer, CALIBRATION_TEXT, args.num_samples,
                                   args.seq_len, seed=args.seed)
    start = time.perf_counter()
    oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe,
            num_calibration_samples=args.num_samples, max_seq_length=args.seq_len)
    windows = args.eval_windows or None
    row = {"recipe": args.recipe.name, "calibration": f"{args.num_samples} x {args.seq_len}",
           "seed": args.seed, "calibration_seconds": round(time.perf_counter() - start, 1),
           "ppl_as_saved": perplexity(model, tokenizer, TEST_TEXT, 2048, windows, device)}
    counts = dict(rows=0, rows_at_tie=0, rows_rounded_to_minus_7=0, weights_rounded_to_minus_7=0)
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear) or not hasattr(module, "weight_scale"):
            continue
        weight, scale = module.weight.data, module.weight_scale.data
        mask = tied_low(weight, scale)
        counts["rows"] += weight.shape[0]
        counts["rows_at_tie"] += int(at_tie(weight, scale).sum())
        counts["rows_rounded_to_minus_7"] += int(mask.any(dim=-1).sum())
        counts["weights_rounded_to_minus_7"] += int(mask.sum())
        send_to_minus_eight(weight, scale, mask)
    row |= counts
    row["ppl_ties_at_minus_8"] = perplexity(model, tokenizer, TEST_TEXT, 2048, windows, device)
    print(json.dumps(row), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(row, indent=2))
    print(table(row))


def table(row: dict) -> str:
    return "\n".join([
        "| recipe | rows | at the tie | rounded to -7 (rows / weights) | ppl as saved | "
        "ppl, ties at -8 |", "|---|---|---|---|---|---|",
        f"| {row['recipe']} | {row['rows']} | {row['rows_at_tie']} | "
        f"{row['rows_rounded_to_minus_7']} / {row['weights_rounded_to_minus_7']} | "
        f"{row['ppl_as_saved']:.3f} | {row['ppl_ties_at_minus_8']:.3f} |",
    ])


if __name__ == "__main__":
    main()
