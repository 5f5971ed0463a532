"""
One real ``oneshot`` at the shape of a real model: a randomly initialised model of
that shape (all of its layers, or the first ``--layers``), loaded in CPU memory in
bfloat16 as models are, calibrated with a recipe on random tokens; llm-compressor's
sequential pipeline moves each decoder layer to the GPU. Reports the time per decoder
layer, the total, peak GPU and host memory, and projects the full depth (from the time
between layers; setup, the first layer's compilation and finalize counted once). Writes JSON,
prints a table; not a timed test. Quality is not measured (random weights).

    python benchmarks/oneshot_scale.py --shape qwen3-30b-a3b --layers 6 \\
        --recipe recipes/flatquant_w4a4_moe.yaml --json oneshot.json

Under ``torchrun --nproc_per_node N`` it calibrates data-parallel (each rank its shard
of the samples, one GPU per rank); the row gets ``world_size`` and per-rank peaks.
"""

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from scale import SHAPES  # noqa: E402

import flatquant_modifier  # noqa: E402, F401  (registers FlatQuantModifier for YAML)
from examples.common.synthetic import byte_tokenizer, random_token_dataset  # noqa: E402
from flatquant_modifier.compat import shard_dataset  # noqa: E402
from flatquant_modifier.distributed import init_distributed, is_source_process  # noqa: E402
from flatquant_modifier.options import FlatQuantOptions  # noqa: E402


def build_model(shape: str, layers: int | None):
    import transformers

    config_cls, fields, depth = SHAPES[shape]
    config = getattr(transformers, config_cls)(
        **fields, num_hidden_layers=layers or depth, max_position_embeddings=8192,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    # random initialisation is much faster on a GPU; the model then lives in CPU memory
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.to("cpu").eval(), depth


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers to build (default: the model's depth)")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes/flatquant_w4a4.yaml")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=None,
                        help="FlatQuant epochs instead of the recipe's (a shorter run): "
                        "the projection scales the training time to the recipe's epochs")
    parser.add_argument("--calib-batch-size", type=int, default=1,
                        help="oneshot's batch_size: samples per layer call of llm-compressor's "
                        "calibration and propagation passes")
    parser.add_argument("--offload-device", default="cpu",
                        help="oneshot's sequential_offload_device: where the layer inputs of "
                        "all samples wait between layers (cuda: they stay on the GPU instead "
                        "of going to CPU memory and back for every layer)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    recipe, recipe_epochs = with_epochs(args.recipe, args.epochs)

    from llmcompressor import oneshot

    distributed = init_distributed()  # torchrun: one GPU per rank (compressed-tensors')
    start = time.perf_counter()
    model, depth = build_model(args.shape, args.layers)
    layers = model.config.num_hidden_layers
    build_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as directory:
        # oneshot reads config.json and the processor from the model's directory
        model.config.save_pretrained(directory)
        byte_tokenizer().save_pretrained(directory)
        model.name_or_path = model.config._name_or_path = directory
        # every rank draws the same samples and calibrates on its own shard of them
        dataset = shard_dataset(random_token_dataset(args.num_samples, args.seq_len,
                                                     vocab_size=model.config.vocab_size))
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        starts = {}  # when each decoder layer is first called: the pipeline reaches it

        def reached(index):
            def hook(*_):  # returns None: the layer's inputs unchanged
                starts.setdefault(index, time.perf_counter())
            return hook

        hooks = [layer.register_forward_pre_hook(reached(i))
                 for i, layer in enumerate(model.model.layers)]
        start = time.perf_counter()
        oneshot(model=model, processor=byte_tokenizer(), dataset=dataset,
                recipe=recipe, num_calibration_samples=len(dataset),
                max_seq_length=args.seq_len, batch_size=args.calib_batch_size,
                sequential_offload_device=args.offload_device)
        seconds = time.perf_counter() - start
        for hook in hooks:
            hook.remove()
    reports = [r for m in _flatquant_modifiers() for r in m.reports]
    training = sum(r.seconds for r in reports)
    epochs = args.epochs if args.epochs is not None else recipe_epochs
    once, budget_seconds = project_seconds(
        seconds, [starts[i] for i in sorted(starts)],
        [r.epoch_seconds[-1] for r in reports if r.epoch_seconds],
        recipe_epochs - epochs, layers, depth)
    peaks = {
        "peak_gpu_GiB": (round(torch.cuda.max_memory_allocated() / 2**30, 2)
                         if torch.cuda.is_available() else None),
        "peak_host_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    world = 1
    if distributed:  # the largest peak over ranks in the row, every rank's in a list
        world = torch.distributed.get_world_size()
        per_rank = [None] * world
        torch.distributed.all_gather_object(per_rank, peaks)
        peaks = {key: max((p[key] for p in per_rank), key=lambda v: v or 0)
                 for key in peaks} | {
            f"{key}_per_rank": [p[key] for p in per_rank] for key in peaks}
    row = {
        "shape": args.shape,
        "recipe": args.recipe.name,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "calibration": f"{args.num_samples} x {args.seq_len}",
        "epochs": epochs,
        "recipe_epochs": recipe_epochs,
        "world_size": world,
        "calib_batch_size": args.calib_batch_size,
        "offload_device": args.offload_device,
        "layers": layers,
        "depth": depth,
        "build_seconds": round(build_seconds, 1),
        "oneshot_seconds": round(seconds, 1),
        "seconds_per_layer": round(seconds / layers, 1),
        "training_seconds": round(training, 1),
        "one_time_seconds": round(once, 1),
        "projected_full_depth_minutes": round(budget_seconds / 60, 1),
        **peaks,
    }
    if is_source_process():  # one report per run
        print(json.dumps(row), flush=True)
        if args.json is not None:
            args.json.write_text(json.dumps(row, indent=2))
        print("| shape | ranks | layers | epochs | oneshot | per layer | projected, all "
              f"layers, {recipe_epochs} epochs | peak GPU | peak host |")
        print("|---|---|---|---|---|---|---|---|---|")
        print(f"| {row['shape']} | {world} | {layers} of {depth} | {epochs} | "
              f"{row['oneshot_seconds']} s | {row['seconds_per_layer']} s | "
              f"{row['projected_full_depth_minutes']} min | {row['peak_gpu_GiB']} GiB | "
              f"{row['peak_host_GiB']} GiB |")
    if distributed:
        torch.distributed.destroy_process_group()


def project_seconds(seconds: float, starts: list[float], last_epoch_seconds: list[float],
                    missing_epochs: int, layers: int, depth: int) -> tuple[float, float]:
    """
    ``(once, projected)``: the seconds a run of ``layers`` decoder layers projects for
    ``depth`` layers and the recipe's epochs. ``seconds``: the whole run; ``starts``:
    when the pipeline reached each layer. A layer takes the median time from one start
    to the next after the first layer's; ``once`` is the rest of the run (setup, the
    first layer's compilation and graph captures, finalize), counted once. The epochs
    a shorter run left out are added at each layer's last epoch time (every epoch takes
    the same steps). One layer has nothing to compare with: it all scales with the depth.
    """
    gaps = sorted(b - a for a, b in zip(starts[1:], starts[2:]))
    if not gaps:  # fewer than three layers: the first layer's time, or the mean
        gaps = [starts[1] - starts[0]] if len(starts) > 1 else [seconds / layers]
    per_layer = gaps[len(gaps) // 2]
    once = max(seconds - layers * per_layer, 0.0)
    missing = missing_epochs * sum(last_epoch_seconds) / layers
    return once, once + depth * (per_layer + missing)


def with_epochs(path: Path, epochs: int | None) -> tuple[str, int]:
    """The recipe (YAML text) with every FlatQuantModifier's ``epochs`` set to
    ``epochs`` (None: as it is), and the recipe's own epochs."""
    import yaml

    recipe = yaml.safe_load(path.read_text())
    found = []

    def visit(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "FlatQuantModifier" and isinstance(value, dict):
                    found.append(value.get("epochs", FlatQuantOptions().epochs))
                    if epochs is not None:
                        value["epochs"] = epochs
                else:
                    visit(value)

    visit(recipe)
    if not found:
        raise SystemExit(f"{path}: no FlatQuantModifier to take --epochs")
    return yaml.safe_dump(recipe), found[0]


def _flatquant_modifiers():
    from llmcompressor.core import active_session

    from flatquant_modifier import FlatQuantModifier

    recipe = active_session().lifecycle.recipe
    return [m for m in getattr(recipe, "modifiers", []) if isinstance(m, FlatQuantModifier)]


if __name__ == "__main__":
    main()
