"""
Where W4A4 loses quality on SmolLM2-135M-Instruct: the WikiText-2 test perplexity
when only decoder layer i is quantized (FlatQuant W4A4 with the recipe's options, the
other layers and lm_head in full precision), for every layer i, with its layer loss
before and after training. Writes JSON and prints a Markdown table; not a timed test.

    python benchmarks/layer_sensitivity.py --num-samples 128 --seq-len 2048 \\
        --layers 0-29 --out outputs/layer_sensitivity.json
"""

import argparse
import json
import sys
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

W4_CHANNEL = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel",
              "observer": "minmax"}


def only_layer(index: int, epochs: int) -> list:
    """FlatQuant W4A4 and int4 weights on decoder layer ``index`` alone."""
    others = f"re:^model\\.layers\\.(?!{index}\\.)\\d+\\..*"
    return [
        FlatQuantModifier(epochs=epochs, ignore=["lm_head", others]),
        QuantizationModifier(config_groups={"w4": {
            "targets": [f"re:^model\\.layers\\.{index}\\..*_proj$"], "weights": W4_CHANNEL}}),
    ]


def parse_layers(text: str) -> list[int]:
    layers = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        layers += list(range(int(first), int(last or first) + 1))
    return layers


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", default="0-29", help="e.g. 0-29 or 0,27-29")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--eval-windows", type=int, default=0, help="0: all")
    parser.add_argument("--model-cache", default=str(ROOT / "outputs" / "smollm2-hf"))
    parser.add_argument("--out", default=str(ROOT / "outputs" / "layer_sensitivity.json"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, tokenizer = load_smollm2(args.model_cache)
    dataset = text_windows_dataset(tokenizer, CALIBRATION_TEXT, args.num_samples,
                                   args.seq_len, seed=0)
    windows = args.eval_windows or None
    rows = []
    for index in parse_layers(args.layers):
        model, _ = load_smollm2(args.model_cache)
        model.to(device)
        recipe = only_layer(index, args.epochs)
        torch.manual_seed(0)
        start = time.perf_counter()
        oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe,
                num_calibration_samples=args.num_samples, max_seq_length=args.seq_len)
        [report] = recipe[0].reports
        rows.append({
            "layer": index,
            "ppl": round(perplexity(model, tokenizer, TEST_TEXT, 2048, windows), 3),
            "loss_rtn": report.loss_rtn, "loss_final": report.loss_final,
            "seconds": round(time.perf_counter() - start, 1),
        })
        print(json.dumps(rows[-1]), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "budget": f"{args.num_samples} x {args.seq_len}, {args.epochs} epochs",
            "eval_windows": args.eval_windows or "all", "rows": rows}, indent=2))
    print("\n| layer | ppl | loss round-to-nearest | loss FlatQuant |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['ppl']:.2f} | {r['loss_rtn']:.3g} | {r['loss_final']:.3g} |")


if __name__ == "__main__":
    main()
