"""Sample-quality and likelihood metrics: FID/IS/KID and precision/recall with the FID Inception-v3,
bits/dim by the variational bound, and offline digits metrics. Submodules import without TensorFlow."""
