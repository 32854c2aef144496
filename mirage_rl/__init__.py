"""mirage-rl: latent visual reasoning (Mirage, arXiv 2506.17218) for vision-language models."""

__version__ = "0.1.0"
