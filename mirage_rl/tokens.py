"""The latent tokens as text: the three strings every part of the project agrees on (no torch: the reward plugins
import them). Their ids live in a checkpoint's config (:class:`mirage_rl.modeling.LatentTokens`)."""

LATENT_START, LATENT_PAD, LATENT_END = "<|latent_start|>", "<|latent_pad|>", "<|latent_end|>"
LATENT_TOKENS = (LATENT_START, LATENT_PAD, LATENT_END)
