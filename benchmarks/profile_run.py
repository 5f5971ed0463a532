"""
Profile the training steps of one decoder layer inside a real calibration run: any
script that calibrates with FlatQuantModifier (the SmolLM2 example, variants.py) runs
as usual, and the training of layer ``--layer`` is recorded by torch.profiler over a
window of its optimisation steps. Prints the GPU kernel time per step by category and
kernel (as ``scale.py --profile`` does for a random layer), and writes JSON with the
host's time per step and the layer's epoch times, plus a Chrome trace.

``--between`` profiles instead everything between the training of layer ``--layer`` - 1
and that of ``--layer``: the end of the previous layer's calibration (absorption,
quantization, evaluation), llm-compressor's propagation and calibration passes, and the
layer's own preparation (targets, step plan). It records the Python call stack and
prints the wall time, the GPU's busy time and the Python functions that took longest.

    python benchmarks/profile_run.py --layer 10 --out outputs/profile-run -- \\
        benchmarks/variants.py --variants lr-2e-2 --num-samples 128 --seq-len 2048 \\
        --eval-windows 8 --dtype bfloat16

The other layers train unprofiled; the run's own figures (calibration time,
perplexity) include the profiled layer's overhead. Not a timed test.
"""

import argparse
import json
import re
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


def profiled_between(train_layer, layer: int, out: Path, report: dict):
    """``train_layer`` that profiles the time from the return of layer ``layer`` - 1's
    training to the start of layer ``layer``'s (CPU with Python stacks, and CUDA)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    window: dict = {}

    def wrapped(name, *args, **kwargs):
        if name.endswith(f"layers.{layer}") and "prof" in window:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds = time.perf_counter() - window["start"]
            window["prof"].stop()
            window["prof"].export_chrome_trace(str(out / "trace.json"))
            summary = between_summary(json.loads((out / "trace.json").read_text()),
                                      window["enclosing"])
            summary.update(layer=name, wall_ms=round(1000 * seconds, 1))
            report["between"] = summary
            print(f"{name}: {summary['wall_ms']} ms since the previous layer's training, "
                  f"GPU busy {summary['gpu_busy_ms']} ms", flush=True)
            for function, ms, calls in summary["python_ms"]:
                print(f"{ms:10.2f} ms {calls:6d}x  {function}", flush=True)
            del window["prof"]
        result = train_layer(name, *args, **kwargs)
        report["epoch_seconds"][name] = [round(s, 4) for s in result.epoch_seconds]
        if name.endswith(f"layers.{layer - 1}"):
            window["enclosing"] = _enclosing_frames()
            window["prof"] = torch.profiler.profile(activities=activities, with_stack=True)
            window["prof"].start()
            window["start"] = time.perf_counter()
        return result

    return wrapped


def _frame_key(name: str):
    """(file name, line, function) of a trace's Python function event."""
    match = re.fullmatch(r"(.*)\((\d+)\): (.*)", name)
    return (Path(match[1]).name, int(match[2]), match[3]) if match else None


def _enclosing_frames() -> set:
    """The calling Python stack, keyed as :func:`_frame_key` keys trace events (a
    function on the stack when profiling starts is named by its current line)."""
    frames, frame = set(), sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        frames.add((Path(code.co_filename).name, frame.f_lineno, code.co_name))
        frame = frame.f_back
    return frames


def between_summary(trace: dict, enclosing: set = frozenset(), rows: int = 40) -> dict:
    """The GPU's busy time and the Python functions (inclusive time, summed over calls,
    one entry per function; not those of the ``enclosing`` stack the profile started
    in) and kernels that took longest in a Chrome trace."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    kernels: dict[str, float] = {}
    functions: dict[str, list[float]] = {}
    for event in events:
        category = event.get("cat", "")
        if category == "kernel" or category == "gpu_memcpy" or category == "gpu_memset":
            kernels[event["name"]] = kernels.get(event["name"], 0.0) + event["dur"]
        elif category == "python_function":
            # one entry per function, however often it recursed
            spans = functions.setdefault(event["name"], [])
            spans.append((event["ts"], event["ts"] + event["dur"]))
    inclusive = {}
    for name, spans in functions.items():
        spans.sort()
        total, end = 0.0, float("-inf")
        for begin, finish in spans:  # union of the spans: nested calls counted once
            if finish > end:
                total += finish - max(begin, end)
                end = finish
        inclusive[name] = (total, len(spans))

    def top(table, n):
        return [[name[:140], round(value / 1000, 2)] for name, value in
                sorted(table.items(), key=lambda item: -item[1])[:n]]

    # the call stack the window started in spans all of it: not informative
    within = {name: value for name, value in inclusive.items()
              if _frame_key(name) not in enclosing}
    return {
        "gpu_busy_ms": round(sum(kernels.values()) / 1000, 1),
        "python_ms": [[name[:140], round(total / 1000, 2), calls] for name, (total, calls)
                      in sorted(within.items(), key=lambda item: -item[1][0])[:rows]],
        "kernels_ms": top(kernels, 15),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", type=int, default=10, help="index of the decoder layer")
    parser.add_argument("--skip", type=int, default=64,
                        help="optimizer steps of the layer before the profiled ones")
    parser.add_argument("--active", type=int, default=32, help="profiled steps")
    parser.add_argument("--between", action="store_true",
                        help="profile the time between the training of layer --layer - 1 "
                        "and that of --layer, not its training steps")
    parser.add_argument("--out", type=Path, default=Path("outputs") / "profile-run")
    parser.add_argument("script", help="the calibration script, then its arguments "
                        "(after --)")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"script": args.script, "args": args.args, "epoch_seconds": {}}
    if args.between:
        calibrate.train_layer = profiled_between(
            calibrate.train_layer, args.layer, args.out, report)
    else:
        calibrate.train_layer = profiled_training(
            calibrate.train_layer, args.layer, args.skip, args.active, args.out, report)
    sys.argv = [args.script, *args.args]
    try:
        runpy.run_path(args.script, run_name="__main__")
    finally:
        (args.out / "profile.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
