"""``mirage-rl create-model``: the tiny offline model of a supported family (``--backbone qwen2_5_vl``, the default, or
``qwen3_vl``), from scratch (random weights, a tokenizer trained on the task's text, the latent tokens added). The
seeing base that demos start from is ``mirage-rl base-model``.

Sizes (both families): text hidden 128, 4 layers, 4 attention heads (head_dim 32: the smallest vLLM's CPU attention
serves, ``v1/attention/backends/cpu_attn.py``), 2 KV heads; images resized to 6 x 6 merged visual tokens (168 px for
Qwen2.5-VL's 28-px tokens, 192 px for Qwen3-VL's 32-px ones); Qwen3-VL: 3 vision layers, DeepStack from the first two
(injected after decoder layers 0 and 1)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..backbones import DEFAULT, NAMES


@dataclass
class CreateModelArguments:
    """Arguments of ``mirage-rl create-model``."""

    backbone: str = field(default=DEFAULT, metadata={
        "help": "Model family (its checkpoints' model_type).", "choices": list(NAMES)})
    output_dir: str | None = field(default=None, metadata={
        "help": "Where to save (default outputs/models/tiny-qwen2.5-vl or tiny-qwen3-vl, by backbone)."})
    latent_size: int = field(default=4, metadata={"help": "Latent size k recorded in the config."})
    hidden_size: int = field(default=128, metadata={"help": "Text hidden size."})
    num_layers: int = field(default=4, metadata={"help": "Decoder layers."})
    vocab_size: int = field(default=2048, metadata={"help": "Upper bound of the BPE vocabulary."})
    seed: int = field(default=0, metadata={"help": "Seed of the random weights."})
    rope_theta: float = field(default=10000.0, metadata={
        "help": "Base of the rotary embedding (10 lets a small model tell the map's columns apart)."})
    min_pixels: int | None = field(default=None, metadata={
        "help": "Image processor's smallest image area (pixels; default 164*164 for qwen2_5_vl, 188*188 qwen3_vl)."})
    max_pixels: int | None = field(default=None, metadata={
        "help": "Image processor's largest image area (pixels; default 172*172 / 196*196: 6 x 6 visual tokens): images "
                "are resized to a multiple of 28 px (qwen2_5_vl) or 32 px (qwen3_vl) per side within it. Give a square "
                "a little above the side you want (113*113 = 12769 for 112 px: the processor rounds the side down)."})
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

    from .. import backbones
    from ..limits import check_memory

    if args.output_dir is None:
        args.output_dir = backbones.get(args.backbone, "--backbone").tiny_dir
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
                                             command="create-model", backbone=args.backbone)
    return {"output_dir": args.output_dir, "parameters": sum(p.numel() for p in model.parameters()),
            "vocab": len(processor.tokenizer), "latent_token_ids": model.config.latent_token_ids}
