"""Does a text-to-image run use each part of its captions? Measured without sampling (docs/text_to_image.md).

The first N held-out two-object scenes of two colours, noised to t by q (Eq. 4) with fixed noise
draws; the model's x0 estimate under the true caption, the caption with its relation reversed
("left of" <-> "right of", "above" <-> "below": a caption the image contradicts), with its colours
swapped, and the null text. A model that reads a part of the caption predicts worse without it:
the MSE of x0 rises above the true caption's. Mean over scenes, pixels and draws, per t.
    python benchmarks/shapes_caption_use.py [--workdir=runs/shapes_t2i] [--scenes=256] [--draws=8]
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import checkpoints, generation, image_utils
from ddpm_jax import diffusion as D
from ddpm_jax.evaluation import tasks
from ddpm_jax.evaluation.shapes_checker import OPPOSITE
from ddpm_jax.models import unet_from_config
from ddpm_jax.scenes import parse_caption

parser = argparse.ArgumentParser()
parser.add_argument("--workdir", default="runs/shapes_t2i")
parser.add_argument("--scenes", type=int, default=256)
parser.add_argument("--draws", type=int, default=8, help="noise draws per scene and t")
args = parser.parse_args()
TIMESTEPS = (200, 400, 600, 700, 800, 900)

config = checkpoints.load_config(args.workdir)
params, step = checkpoints.load_params(args.workdir, config)
texts = tasks.captions(config, "test", 8 * args.scenes)  # about half have two objects, most of two colours
images, _ = tasks.real_images(config, "test", 8 * args.scenes)
parsed = [parse_caption(t) for t in texts]
picked = [i for i, (kinds, rel) in enumerate(parsed) if rel and kinds[0][0] != kinds[1][0]][:args.scenes]
pairs = [parsed[i] for i in picked]
captions = {"true": [texts[i] for i in picked],
            "relation reversed": [f"a {a[0]} {a[1]} {OPPOSITE[r]} a {b[0]} {b[1]}" for (a, b), r in pairs],
            "colours swapped": [f"a {b[0]} {a[1]} {r} a {a[0]} {b[1]}" for (a, b), r in pairs],
            "null text": None}
x0 = jnp.asarray(image_utils.from_uint8(images[picked]))
model, s, kind = unet_from_config(config), D.schedule_from_config(config.diffusion), config.diffusion.model_output
apply = jax.jit(lambda x, t, cond: model.apply({"params": params}, x, t, cond))
print(f"{args.workdir} step {step}: {len(picked)} two-object scenes of two colours, x0 MSE at t = {TIMESTEPS}")
for name, caps in captions.items():
    cond = generation.text_cond(config, caps or [""] * len(picked), "--prompt")
    cond["drop"][:] = caps is None
    row = []
    for t in TIMESTEPS:
        tt = jnp.full((len(picked),), t)
        mse = []
        for k in range(args.draws):
            x_t = D.q_sample(s, x0, tt, jax.random.normal(jax.random.key(k), x0.shape))
            mse.append(float(jnp.mean((D.predict_x0(s, kind, apply(x_t, tt, cond), x_t, tt) - x0) ** 2)))
        row.append(np.mean(mse))
    print(f"{name:18s}", " ".join(f"{v:.5f}" for v in row), flush=True)
