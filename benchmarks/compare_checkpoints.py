"""
Largest differences between two FlatQuant checkpoints saved with
``save_pretrained(save_compressed=True)`` (e.g. a 1-rank and a 2-rank calibration of
the same model): per kind of tensor, the max absolute difference over all layers.

    python benchmarks/compare_checkpoints.py OUT_1GPU OUT_2GPU [--json result.json]
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

KINDS = ("left_trans", "right_trans", "clip_ratio", "weight_packed", "weight_scale")


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as reader:
            for key in reader.keys():
                if key.rsplit(".", 1)[-1] in KINDS:
                    tensors[key] = reader.get_tensor(key)
    if not tensors:
        raise FileNotFoundError(f"no FlatQuant tensors in {directory}")
    return tensors


def compare(a: Path, b: Path) -> dict[str, dict[str, float]]:
    first, second = _tensors(a), _tensors(b)
    if first.keys() != second.keys():
        raise ValueError(f"{a} and {b} hold different tensors")
    result: dict[str, dict[str, float]] = defaultdict(lambda: {"max_abs_diff": 0.0})
    for key, value in first.items():
        kind = key.rsplit(".", 1)[-1]
        other = second[key]
        if kind == "weight_packed":  # int4 codes packed in int32: count differing words
            entry = result[kind]
            entry.setdefault("differing_words", 0)
            entry.setdefault("words", 0)
            entry["differing_words"] += int((value != other).sum())
            entry["words"] += value.numel()
            continue
        diff = float((value.double() - other.double()).abs().max())
        entry = result[kind]
        if diff >= entry["max_abs_diff"]:
            entry["max_abs_diff"] = diff
            entry["where"] = key
        entry["max_abs"] = max(entry.get("max_abs", 0.0), float(value.double().abs().max()))
    return dict(result)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = compare(args.first, args.second)
    print("| tensor | max abs diff | max abs value |\n|---|---|---|")
    for kind, entry in result.items():
        if "words" in entry:
            print(f"| {kind} | {entry['differing_words']} of {entry['words']} int32 words "
                  "differ | |")
        else:
            print(f"| {kind} | {entry['max_abs_diff']:.3g} | {entry['max_abs']:.3g} |")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
