"""Local tensorflow-datasets builders; importing this package registers them with tfds."""
from ddpm_jax.datasets.digits import Digits

__all__ = ["Digits"]
