"""``mirage-rl create-model``: the tiny offline Qwen2.5-VL, from scratch (random weights, a tokenizer trained on the
task's text, the latent tokens added). The seeing base that demos start from is ``mirage-rl base-model``."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.images import TINY_MAX_PIXELS, TINY_MIN_PIXELS


@dataclass
class CreateModelArguments:
    """Arguments of ``mirage-rl create-model``."""

    output_dir: str = field(default="outputs/models/tiny-qwen2.5-vl", metadata={"help": "Where to save."})
    latent_size: int = field(default=4, metadata={"help": "Latent size k recorded in the config."})
    hidden_size: int = field(default=128, metadata={"help": "Text hidden size."})
    num_layers: int = field(default=4, metadata={"help": "Decoder layers."})
    vocab_size: int = field(default=2048, metadata={"help": "Upper bound of the BPE vocabulary."})
    seed: int = field(default=0, metadata={"help": "Seed of the random weights."})
    rope_theta: float = field(default=10000.0, metadata={
        "help": "Base of the rotary embedding (10 lets a small model tell the map's columns apart)."})
    min_pixels: int = field(default=TINY_MIN_PIXELS, metadata={
        "help": "Image processor's smallest image area (pixels)."})
    max_pixels: int = field(default=TINY_MAX_PIXELS, metadata={
        "help": "Image processor's largest image area (pixels): images are resized to a multiple of 28 px per side "
                "within it. Give a square a little above the side you want (113*113 = 12769 for 112 px: "
                "the processor rounds the side down)."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Write into an output_dir holding entries no mirage-rl run wrote (they are kept, never deleted)."})
    replace_output_dir: bool = field(default=False, metadata={
        "help": "Replace the finished output another run left in output_dir (only that output's files are replaced; "
                "everything else in the folder is kept). Without it such a folder is refused, unless this is the same "
                "command with the same settings (a resume)."})


def run_create_model(args: CreateModelArguments) -> dict:
    """Build and save the model of ``args`` (the output folder checked and locked first); returns
    ``{"output_dir", "parameters", "vocab", "latent_token_ids"}``.

    Raises:
        OutputDirError: an unusable ``output_dir`` (a file, foreign entries, another run there, or a finished model
            that another command or other settings wrote: :func:`mirage_rl.outputs.check_finished`).
    """
    from dataclasses import asdict

    from ..limits import check_memory
    from ..outputs import output_dir_guard
    from ..tiny import create_tiny_model

    # the decoder's weights (embeddings + about 13 h^2 per layer, fp32), held about three times while built and saved
    params = args.vocab_size * args.hidden_size + args.num_layers * 13 * args.hidden_size ** 2
    check_memory(12 * params, f"create-model with hidden_size={args.hidden_size}, num_layers={args.num_layers}, "
                              f"vocab_size={args.vocab_size} ({params / 1e6:.0f} M parameters)",
                 "lower hidden_size or num_layers")

    with output_dir_guard(args.output_dir, "model", args.overwrite_output_dir, producer="create-model",
                          settings=asdict(args), replace=args.replace_output_dir):
        model, processor = create_tiny_model(args.output_dir, latent_size=args.latent_size,
                                             hidden_size=args.hidden_size, num_layers=args.num_layers,
                                             vocab_size=args.vocab_size, seed=args.seed, rope_theta=args.rope_theta,
                                             min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                                             command="create-model")
    return {"output_dir": args.output_dir, "parameters": sum(p.numel() for p in model.parameters()),
            "vocab": len(processor.tokenizer), "latent_token_ids": model.config.latent_token_ids}
