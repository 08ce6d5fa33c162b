"""``python -m vq4dit.prompts encode --pipeline P --prompts prompts.txt --out embeds.safetensors``:
a prompt file -> a ``--data.prompt_embeds`` file (:mod:`vq4dit.prompts.encode`). A mistake is one
``error:`` line and exit status 2 (``VQ4DIT_DEBUG=1`` shows the traceback)."""

from __future__ import annotations

import argparse
import os
import sys

from .encode import encode_file


def parser() -> argparse.ArgumentParser:
    """The command's arguments (``encode`` is its one subcommand)."""
    main = argparse.ArgumentParser(prog="python -m vq4dit.prompts", description=__doc__.split("\n")[0])
    commands = main.add_subparsers(dest="command", required=True)
    encode = commands.add_parser("encode", help="encode a prompt file (one prompt a line) with a pipeline's text encoder")
    encode.add_argument("--pipeline", required=True, help="pipeline folder or hub id (PixArt: tokenizer/ and text_encoder/; SD3/SD3.5: the two CLIPs and T5; Flux: CLIP-L and T5), "
                        "or pixart_reference")
    encode.add_argument("--prompts", required=True, help="text file, one prompt a line")
    encode.add_argument("--out", required=True, help="the safetensors file to write (skipped when it is up to date)")
    encode.add_argument("--negative-prompt", default="", help="the unconditional branch's prompt (default: empty; Flux has none: an error)")
    encode.add_argument("--max-length", type=int, default=None,
                        help="tokens per prompt: the pipeline's by default (PixArt-Sigma 300, -Alpha 120, pixart_reference 8; "
                        "SD3: T5's 256, after CLIP's 77; Flux: T5's 512, FLUX.1-schnell is run with 256)")
    encode.add_argument("--keep-case", action="store_true",
                        help="encode prompts as written (PixArt's default: lower-cased and stripped, as its pipelines do; SD3, Flux: always as written)")
    encode.add_argument("--batch-size", type=int, default=8, help="prompts per encoder call")
    encode.add_argument("--device", default="cpu", help="where the encoder runs, e.g. cuda")
    encode.add_argument("--dtype", default="float32", help="encoder dtype: float32, bfloat16 or float16")
    return main


def main(argv: list[str] | None = None) -> int:
    """Run the command; 0 on success (written or up to date), 2 on a mistake."""
    args = parser().parse_args(argv)
    try:
        written = encode_file(args.pipeline, args.prompts, args.out, args.negative_prompt, args.max_length,
                              args.batch_size, args.device, args.dtype,
                              keep_case=args.keep_case)
    except ValueError as error:
        if os.environ.get("VQ4DIT_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{'wrote' if written else 'up to date:'} {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
