"""
How far rounding alone moves the perplexity of a 4-bit model, to tell it from a real
difference between a model and its export. Evaluates in float64, on the same windows:
the compressed-tensors checkpoint reloaded with exact fake quantization, the same
model with its first layer's input perturbed by a relative ``--perturbation`` (default
6e-8, the size of one float32 rounding; one run per seed), and the Ascend export
through the NPU-op reference. The export equal to the reload in float64 means one
function; the perturbed runs show how far rounding of float32's size alone moves the
perplexity (4-bit rounding flips amplify it), which is what separates two float32
evaluations of that one function. Writes JSON, prints a table; not a timed test.

    python benchmarks/rounding_sensitivity.py outputs/smollm2-flatquant-w4a4 \
        outputs/smollm2-flatquant-w4a4-ascend --windows 2 --seeds 3
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, CompressedTensorsConfig

from flatquant_modifier import load_flatquant_model
from flatquant_modifier.ascend import load_ascend_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # examples.common, wherever this script is run from
from examples.common.evaluation import exact_fake_quant  # noqa: E402
from examples.common.perplexity import perplexity  # noqa: E402
from examples.common.data import TEST_TEXT  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("checkpoint", help="compressed-tensors checkpoint (save_pretrained)")
    parser.add_argument("ascend", help="its Ascend export")
    parser.add_argument("--windows", type=int, default=2, help="2048-token test windows")
    parser.add_argument("--seeds", type=int, default=3, help="perturbed runs")
    parser.add_argument("--perturbation", type=float, default=6e-8,
                        help="relative size of the perturbation of the first layer's input")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--test-data", default=str(TEST_TEXT))
    parser.add_argument("--out", default=str(ROOT / "outputs" / "rounding_sensitivity.json"))
    return parser.parse_args()


def perturb_first_layer(model, seed: int, size: float):
    """Multiply the first decoder layer's input by ``1 + size * noise``."""
    generator = torch.Generator().manual_seed(seed)

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        noise = torch.randn(hidden.shape, generator=generator, dtype=torch.float64)
        hidden = hidden * (1 + size * noise.to(hidden.device))
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    layer = model.model.layers[0]
    return layer.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)


def main():
    args = parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)

    def ppl(model):
        return perplexity(model, tokenizer, args.test_data, 2048, args.windows, args.device)

    result = {"checkpoint": args.checkpoint, "windows": args.windows,
              "perturbation": args.perturbation}
    reloaded = load_flatquant_model(
        args.checkpoint, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    with exact_fake_quant(reloaded) as exact:
        exact.to(args.device)
        result["reload_float64"] = ppl(exact)
        result["reload_float64_perturbed"] = []
        for seed in range(args.seeds):
            handle = perturb_first_layer(exact, seed, args.perturbation)
            result["reload_float64_perturbed"].append(ppl(exact))
            handle.remove()
    ascend = load_ascend_model(args.ascend, dtype=torch.float64).to(args.device)
    result["ascend_float64"] = ppl(ascend)
    base = result["reload_float64"]
    spread = max(abs(p / base - 1) for p in result["reload_float64_perturbed"])
    result["perturbed_max_relative_change"] = spread
    result["ascend_relative_difference"] = abs(result["ascend_float64"] / base - 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("| evaluation (float64) | perplexity | vs reload |")
    print("|---|---|---|")
    print(f"| reload, exact fake quantization | {base:.3f} | - |")
    for seed, value in enumerate(result["reload_float64_perturbed"]):
        print(f"| same, first-layer input x (1 + {args.perturbation:g} noise), seed {seed} | "
              f"{value:.3f} | {value / base - 1:+.2%} |")
    print(f"| Ascend export, NPU-op reference | {result['ascend_float64']:.3f} | "
          f"{result['ascend_float64'] / base - 1:+.2%} |")


if __name__ == "__main__":
    main()
