"""ddpm_jax: denoising diffusion probabilistic models in JAX/Flax."""
__version__ = "0.1.0"
