"""Local tensorflow-datasets builders; importing this package registers them with tfds."""
from ddpm_jax.datasets.digits import Digits
from ddpm_jax.datasets.faces import Faces
from ddpm_jax.datasets.folder import Folder
from ddpm_jax.datasets.shapes import Shapes

__all__ = ["Digits", "Faces", "Folder", "Shapes"]
