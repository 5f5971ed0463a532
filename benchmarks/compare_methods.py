"""
W4A4 methods compared on SmolLM2-135M-Instruct: WikiText-2 test perplexity,
calibration time and peak memory, against full precision. All W4 per-channel symmetric
weights + A4 per-token symmetric activations, lm_head in full precision:

    fp               full precision
    rtn              llm-compressor QuantizationModifier, round to nearest
    quip             QuIPModifier (random-hadamard, u + v) + W4A4
    spinquant        SpinQuantModifier (R1, R2, R4, random-hadamard) + W4A4
    flatquant-rtn    recipes/flatquant_w4a4.yaml (FlatQuant, RTN weights)
    flatquant-gptq   recipes/flatquant_w4a4_gptq.yaml (FlatQuant, GPTQ weights)
    flatquant-ascend the flatquant-rtn model exported to the Ascend format and run
                     through the NPU-op reference (flatquant_modifier.ascend)

Each method runs in its own process (so peak memory is its own). Writes
``<out>.json``, ``<out>.md`` (the table, also printed) and ``<out>.png``.

    python benchmarks/compare_methods.py                      # quick: first 8 windows
    python benchmarks/compare_methods.py --full               # all 147 windows
    python benchmarks/compare_methods.py --device cuda --num-samples 128 --seq-len 2048
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # examples.common, wherever this script is run from
from examples.common.data import CALIBRATION_TEXT, TEST_TEXT, text_windows_dataset  # noqa: E402
from examples.common.perplexity import perplexity  # noqa: E402
from examples.common.smollm2 import load_smollm2  # noqa: E402
METHODS = ("fp", "rtn", "quip", "spinquant", "flatquant-rtn", "flatquant-gptq")
W4_CHANNEL = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel",
              "observer": "minmax"}
A4_TOKEN = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "token",
            "dynamic": True}


def w4a4():
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return QuantizationModifier(ignore=["lm_head"], config_groups={
        "group_0": {"targets": ["Linear"], "weights": W4_CHANNEL,
                    "input_activations": A4_TOKEN}})


def recipe_for(method: str, epochs: int | None):
    """The recipe of a method (None for full precision)."""
    from llmcompressor.modifiers.transform import QuIPModifier, SpinQuantModifier
    from llmcompressor.recipe import Recipe

    from flatquant_modifier import FlatQuantModifier

    if method == "fp":
        return None
    if method == "rtn":
        return [w4a4()]
    if method == "quip":
        return [QuIPModifier(rotations=["v", "u"], transform_type="random-hadamard",
                             ignore=["lm_head"]), w4a4()]
    if method == "spinquant":
        return [SpinQuantModifier(rotations=["R1", "R2", "R4"],
                                  transform_type="random-hadamard"), w4a4()]
    name = {"flatquant-rtn": "flatquant_w4a4", "flatquant-gptq": "flatquant_w4a4_gptq"}
    recipe = Recipe.create_instance(str(ROOT / "recipes" / f"{name[method]}.yaml"))
    for modifier in recipe.modifiers:
        if isinstance(modifier, FlatQuantModifier) and epochs is not None:
            modifier.epochs = epochs
    return recipe


def run_one(method: str, args) -> list[dict]:
    """Calibrate and evaluate one method in this process; rows for the table."""
    import torch
    from llmcompressor import oneshot

    import flatquant_modifier  # noqa: F401  registers FlatQuantModifier for YAML
    from flatquant_modifier.ascend import load_ascend_model, save_ascend_checkpoint

    device = torch.device(args.device)
    model, tokenizer = load_smollm2(args.model_cache)
    model.to(device)
    windows = None if args.full else args.eval_windows
    test = TEST_TEXT
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    row = {"method": method, "calibration_seconds": 0.0}
    recipe = recipe_for(method, args.epochs)
    if recipe is not None:
        dataset = text_windows_dataset(tokenizer, CALIBRATION_TEXT,
                                       args.num_samples, args.seq_len, seed=args.seed)
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe,
                num_calibration_samples=args.num_samples, max_seq_length=args.seq_len)
        row["calibration_seconds"] = round(time.perf_counter() - start, 1)
    row["peak_rss_GiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    if device.type == "cuda":
        row["peak_gpu_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    row["ppl"] = perplexity(model, tokenizer, test, 2048, windows)
    rows = [row]
    if method == "flatquant-rtn":
        with tempfile.TemporaryDirectory() as tmp:
            save_ascend_checkpoint(model, Path(tmp) / "ascend", tokenizer)
            del model
            ascend = load_ascend_model(Path(tmp) / "ascend").to(device)
            rows.append({**row, "method": "flatquant-ascend",
                         "ppl": perplexity(ascend, tokenizer, test, 2048, windows)})
    return rows


def table(result: dict) -> str:
    fp = next((r["ppl"] for r in result["rows"] if r["method"] == "fp"), None)
    lines = [
        f"| method | ppl ({result['eval']}) | x FP | calibration | peak memory |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        peak = (f"{r['peak_gpu_GiB']} GiB GPU" if "peak_gpu_GiB" in r
                else f"{r['peak_rss_GiB']} GiB RSS")
        ratio = f"{r['ppl'] / fp:.2f}x" if fp else "-"
        lines.append(f"| {r['method']} | {r['ppl']:.2f} | {ratio} | "
                     f"{r['calibration_seconds']} s | {peak} |")
    return "\n".join(lines)


def plot(result: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["method"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.barh(names, [r["ppl"] for r in rows], color="tab:blue")
    left.set_xscale("log")
    left.set_xlabel(f"WikiText-2 perplexity ({result['eval']}, log scale)")
    left.invert_yaxis()
    right.barh(names, [r["calibration_seconds"] for r in rows], color="tab:orange")
    right.set_xlabel("calibration time (s)")
    right.invert_yaxis()
    fig.suptitle(f"SmolLM2-135M-Instruct W4A4, {result['calibration']}, {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=None, help="override FlatQuant's")
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--full", action="store_true", help="all test windows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-cache", default=str(ROOT / "outputs" / "smollm2-hf"))
    parser.add_argument("--out", default=str(ROOT / "outputs" / "compare_methods"))
    parser.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.run_one:  # child process: one method, rows as JSON on the last line
        print(json.dumps(run_one(args.run_one, args)))
        return

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "model": "SmolLM2-135M-Instruct",
        "date": date.today().isoformat(),
        "device": args.device if args.device == "cpu" else _gpu_name(),
        "calibration": f"{args.num_samples} x {args.seq_len}",
        "eval": "all windows" if args.full else f"first {args.eval_windows} windows",
        "rows": [],
    }
    forwarded = ["--device", args.device, "--num-samples", str(args.num_samples),
                 "--seq-len", str(args.seq_len), "--eval-windows", str(args.eval_windows),
                 "--seed", str(args.seed), "--model-cache", args.model_cache]
    forwarded += ["--full"] if args.full else []
    forwarded += ["--epochs", str(args.epochs)] if args.epochs is not None else []
    for method in args.methods.split(","):
        if method not in METHODS:
            parser.error(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        proc = subprocess.run(
            [sys.executable, __file__, *forwarded, "--run-one", method],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"{method} failed (exit {proc.returncode})")
        rows = json.loads(proc.stdout.strip().splitlines()[-1])
        result["rows"].extend(rows)
        for row in rows:
            print(json.dumps(row), flush=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    text = table(result)
    out.with_suffix(".md").write_text(text + "\n")
    plot(result, out.with_suffix(".png"))
    print("\n" + text)


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cuda"


if __name__ == "__main__":
    main()
