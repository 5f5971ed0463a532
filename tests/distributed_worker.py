"""
Run by tests/test_distributed.py, under ``torchrun`` (gloo on the CPU) or alone:
FlatQuant + W4 round-to-nearest weights through ``oneshot`` on the tiny Llama, then
both checkpoint formats, then a dump of what the test compares (per rank).

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py \
        --model DIR --out DIR [--fail-rank R] [--fp-propagation]
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flatquant_modifier.calibrate as calibrate_module  # noqa: E402
from flatquant_modifier import FlatQuantModifier  # noqa: E402
from flatquant_modifier.ascend import save_ascend_checkpoint  # noqa: E402
from flatquant_modifier.compat import shard_dataset
from flatquant_modifier.distributed import init_distributed  # noqa: E402
from flatquant_modifier.transform import get_flatquant_transform  # noqa: E402
from llmcompressor import oneshot  # noqa: E402
from tests.conftest import load_tiny, random_token_dataset  # noqa: E402
from tests.helpers import logits, weight_quantizer  # noqa: E402


def inject_failure(rank: int):
    """Make this rank raise while training the second decoder layer."""
    train_layer = calibrate_module.train_layer

    def failing(name, *args, **kwargs):
        if name.endswith("layers.1"):
            raise RuntimeError(f"injected failure on rank {rank} in {name}")
        return train_layer(name, *args, **kwargs)

    calibrate_module.train_layer = failing


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--fail-rank", type=int, default=None)
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--fp-propagation", dest="propagate_activation_quant",
                        action="store_false")
    parser.add_argument("--float64", action="store_true",
                        help="calibrate a float64 copy of the model (FlatQuant then trains "
                        "in float64)")
    parser.add_argument("--model-on-gpu", action="store_true",
                        help="move the model to this rank's GPU first (else it stays on "
                        "the CPU and llm-compressor onloads each layer to the GPU)")
    args = parser.parse_args()
    distributed = init_distributed()
    rank = dist.get_rank() if distributed else 0
    if args.fail_rank == rank:
        inject_failure(rank)
    out = Path(args.out)
    model, tok = load_tiny(Path(args.model))
    if args.float64:
        model.to(torch.float64)
    offload = {}
    if args.model_on_gpu:
        device = f"cuda:{torch.cuda.current_device()}"
        model.to(device)
        offload["sequential_offload_device"] = device
    flatquant = FlatQuantModifier(
        epochs=3, batch_size=4, propagate_activation_quant=args.propagate_activation_quant
    )
    dataset = shard_dataset(random_token_dataset(args.num_samples, 32))
    torch.manual_seed(0)
    oneshot(model=model, processor=tok, dataset=dataset,
            recipe=[flatquant, weight_quantizer()],
            num_calibration_samples=len(dataset), max_seq_length=32, **offload)

    dump = {"reports": [vars(r) for r in flatquant.reports], "transforms": {},
            "weights": {}, "weight_scales": {}}
    for name, module in model.named_modules():
        transform = get_flatquant_transform(module)
        if transform is not None:
            dump["transforms"][name] = {
                key: getattr(transform, key).detach().clone()
                for key in ("left_trans", "right_trans", "clip_ratio")
            }
        if hasattr(module, "weight_scale"):
            dump["weights"][name] = module.weight.detach().clone()
            dump["weight_scales"][name] = module.weight_scale.detach().clone()
    # the function of the model in memory, before save_pretrained packs it
    dump["logits"] = logits(model).cpu()
    # per-rank paths show which ranks write; real runs give every rank the same path
    model.save_pretrained(out / f"compressed-rank{rank}", save_compressed=True)
    save_ascend_checkpoint(model, out / f"ascend-rank{rank}", tok)
    torch.save(dump, out / f"rank{rank}.pt")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
