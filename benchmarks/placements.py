"""
The example in the placements a GPU user chooses, each model evaluated in memory
after ``oneshot``, as its compressed-tensors checkpoint reloaded, and as its Ascend
export through the NPU-op reference (float32, and float64 to separate float32
rounding from a real difference). Writes JSON and prints a Markdown table; not a
timed test.

    python benchmarks/placements.py --gpus 0,1 -- --num-samples 32 --seq-len 512

Placements: ``gpu`` (the model moved to the GPU first, layer inputs kept there) and
``cpu`` (the model left in CPU memory, llm-compressor onloading one layer at a time).
With several ``--gpus`` the placements run side by side, one GPU each.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLACEMENTS = {"gpu": [], "cpu": ["--keep-model-on-cpu"]}
COLUMNS = [  # (result key, column title)
    ("ppl_w4a4", "in memory"),
    ("ppl_reloaded", "compressed-tensors reload"),
    ("ppl_ascend_reference", "Ascend export"),
    ("ppl_reloaded_float64", "reload, float64"),
    ("ppl_ascend_reference_float64", "Ascend, float64"),
]


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--placements", default="gpu,cpu", help="comma-separated")
    parser.add_argument("--gpus", default="0", help="GPU indices, one placement each at a time")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "placements"))
    parser.add_argument("example_args", nargs="*", help="options of the example, after --")
    return parser.parse_args()


def command(placement: str, out: Path, example_args: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "examples" / "flatquant_smollm2.py"), *example_args,
            *PLACEMENTS[placement], "--eval-reload", "--eval-ascend", "--eval-float64",
            "--output-dir", str(out / placement / "smollm2-flatquant-w4a4")]


def table(results: dict[str, dict]) -> str:
    keys = [(k, t) for k, t in COLUMNS if any(k in r for r in results.values())]
    lines = ["| placement | calibration | " + " | ".join(t for _, t in keys) + " |",
             "|---" * (len(keys) + 2) + "|"]
    for placement, result in results.items():
        cells = [f"{result[k]:.2f}" if k in result else "-" for k, _ in keys]
        lines.append(f"| {placement} | {result.get('calibration_seconds', '-')} s | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    placements = args.placements.split(",")
    gpus = args.gpus.split(",")
    results = {}
    for start in range(0, len(placements), len(gpus)):
        running = []
        for placement, gpu in zip(placements[start:start + len(gpus)], gpus):
            log = open(out / f"{placement}.log", "w")
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
            running.append((placement, log, subprocess.Popen(
                command(placement, out, args.example_args), stdout=log,
                stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            )))
        for placement, log, process in running:
            if process.wait() != 0:
                raise SystemExit(f"{placement} failed, see {log.name}")
            log.close()
            lines = (out / f"{placement}.log").read_text().splitlines()
            results[placement] = json.loads(next(
                line for line in reversed(lines) if line.startswith("{")
            ))
    (out / "placements.json").write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
