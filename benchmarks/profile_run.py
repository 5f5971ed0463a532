"""
Profile the training steps of one decoder layer inside a real calibration run: any
script that calibrates with FlatQuantModifier (the SmolLM2 example, variants.py) runs
as usual, and the training of layer ``--layer`` is recorded by torch.profiler over a
window of its optimisation steps. Prints the GPU kernel time per step by category and
kernel (as ``scale.py --profile`` does for a random layer), and writes JSON with the
host's time per step and the layer's epoch times, plus a Chrome trace.

    python benchmarks/profile_run.py --layer 10 --out outputs/profile-run -- \\
        benchmarks/variants.py --variants lr-2e-2 --num-samples 128 --seq-len 2048 \\
        --eval-windows 8 --dtype bfloat16

The other layers train unprofiled; the run's own figures (calibration time,
perplexity) include the profiled layer's overhead. Not a timed test.
"""

import argparse
import json
import runpy
import sys
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

sys.path.insert(0, str(Path(__file__).resolve().parent))  # profile_layer
from profile_layer import kernel_times, step_kernel_table  # noqa: E402

import flatquant_modifier.calibrate as calibrate  # noqa: E402


def profiled_training(train_layer, layer: int, skip: int, active: int, out: Path,
                      report: dict):
    """``train_layer`` that profiles steps ``skip`` to ``skip + active`` of the layer
    named ``*.layers.<layer>`` (the optimizer's step hook advances the profiler) and
    records every layer's epoch times into ``report``."""
    cuda = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    def profiled(name, *args, **kwargs):
        stamps: list[float] = []
        # warm-up steps are recorded and dropped by the schedule: 1 of them
        schedule = torch.profiler.schedule(wait=max(skip - 1, 0), warmup=min(skip, 1),
                                           active=active, repeat=1)
        prof = torch.profiler.profile(activities=activities, schedule=schedule)

        def step(*_):
            stamps.append(time.perf_counter())
            prof.step()

        prof.start()
        handle = register_optimizer_step_post_hook(step)
        try:
            result = train_layer(name, *args, **kwargs)
        finally:
            handle.remove()
            prof.stop()
        prof.export_chrome_trace(str(out / "trace.json"))
        table = step_kernel_table({}, kernel_times(prof), active, rows=30) if cuda else (
            prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
        print(table, flush=True)
        (out / "kernels.md").write_text(table + "\n")
        gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
        per_epoch = max(len(stamps) // max(len(result.epoch_seconds), 1), 1)
        report["profiled"] = {
            "layer": name, "steps": [skip, skip + active],
            # the host's median time between two optimizer steps: below the step time
            # when the host runs ahead of the GPU
            "host_ms_per_step_median": round(1000 * gaps[len(gaps) // 2], 3) if gaps else None,
            # wall time per step of each epoch (the profiled ones slowed by the profiler)
            "ms_per_step_by_epoch": [round(1000 * s / per_epoch, 3)
                                     for s in result.epoch_seconds],
        }
        return result

    def wrapped(name, *args, **kwargs):
        chosen = name.endswith(f"layers.{layer}")
        result = (profiled if chosen else train_layer)(name, *args, **kwargs)
        report["epoch_seconds"][name] = [round(s, 4) for s in result.epoch_seconds]
        return result

    return wrapped


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", type=int, default=10, help="index of the decoder layer")
    parser.add_argument("--skip", type=int, default=64,
                        help="optimizer steps of the layer before the profiled ones")
    parser.add_argument("--active", type=int, default=32, help="profiled steps")
    parser.add_argument("--out", type=Path, default=Path("outputs") / "profile-run")
    parser.add_argument("script", help="the calibration script, then its arguments "
                        "(after --)")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"script": args.script, "args": args.args, "epoch_seconds": {}}
    calibrate.train_layer = profiled_training(
        calibrate.train_layer, args.layer, args.skip, args.active, args.out, report)
    sys.argv = [args.script, *args.args]
    try:
        runpy.run_path(args.script, run_name="__main__")
    finally:
        (args.out / "profile.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
