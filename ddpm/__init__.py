"""ddpm-jax: denoising diffusion probabilistic models as small, pure, tested JAX functions."""
