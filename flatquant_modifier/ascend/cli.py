"""``flatquant-export-ascend``: convert a saved FlatQuant compressed-tensors checkpoint
into the vllm-ascend layout (W4A4_FLATQUANT_DYNAMIC or W4A4_MXFP4_FLATQUANT, W8A8_DYNAMIC,
FLOAT per tensor).

    flatquant-export-ascend outputs/smollm2-flatquant-w4a4 outputs/smollm2-ascend
"""

import argparse
from pathlib import Path


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(
        prog="flatquant-export-ascend", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("checkpoint", help="directory written by save_pretrained(..., "
                        "save_compressed=True) after FlatQuantModifier")
    parser.add_argument("output", help="directory to write the Ascend checkpoint to (a new "
                        "one: not the checkpoint, nor inside or around it)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output directory (only once the new "
                        "checkpoint is complete)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors shard (an index is written when sharded)")
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).is_dir():
        parser.error(f"{args.checkpoint}: no such directory")

    from transformers import AutoTokenizer, CompressedTensorsConfig

    from flatquant_modifier.ascend.export import (
        AscendExportError,
        check_destination,
        save_ascend_checkpoint,
    )
    from flatquant_modifier.loading import load_flatquant_model
    from flatquant_modifier.verify import FlatQuantStateError

    try:
        check_destination(Path(args.output), args.checkpoint)  # before loading anything
        # dequantize=True: weights as weight_int * weight_scale, scheme and scales kept
        model = load_flatquant_model(
            args.checkpoint, quantization_config=CompressedTensorsConfig(dequantize=True)
        )
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
        except (OSError, ValueError):
            tokenizer = None
        save_ascend_checkpoint(
            model, args.output, tokenizer, overwrite=args.overwrite,
            max_shard_size=args.max_shard_size,
        )
    except (AscendExportError, FlatQuantStateError, FileExistsError, FileNotFoundError,
            ValueError) as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    print(args.output)


if __name__ == "__main__":
    main()
