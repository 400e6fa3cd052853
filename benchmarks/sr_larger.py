"""Super-resolution at twice the trained size, measured on runs/shapes_sr (docs/super_resolution.md).

The first 4N held-out scenes (32x32) tiled 2 x 2 into N 64x64 images; each is area-downsampled to
32x32 (so its four tiles are exactly the scenes' 16x16 inputs) and upscaled to 64x64 by the model
trained 16 -> 32. Control: the same 16x16 inputs upscaled one by one at the trained size. Both under
the null text (no caption describes four scenes), the run's sampler. Reported per 32x32 tile against
its scene: PSNR, SSIM, consistency with its 16x16 input, and the shapes checker's rates under the
scene's caption; bicubic beside them.
    python benchmarks/sr_larger.py [--workdir=runs/shapes_sr] [--num_tiled=50]
"""
import argparse
import json

import numpy as np

from ddpm_jax import checkpoints, generation, image_utils, superres
from ddpm_jax.evaluation import super_resolution, tasks

parser = argparse.ArgumentParser()
parser.add_argument("--workdir", default="runs/shapes_sr")
parser.add_argument("--num_tiled", type=int, default=50, help="64x64 images of 4 scenes each")
args = parser.parse_args()

config = checkpoints.load_config(args.workdir)
params, step = checkpoints.load_params(args.workdir, config)
n, size, low = 4 * args.num_tiled, config.data.image_size, config.model.low_res_size
originals, _ = tasks.real_images(config, "test", n)
captions = tasks.captions(config, "test", n)
low_res = image_utils.to_uint8(superres.downsample(image_utils.from_uint8(originals), low))


def tile(x):
    """`[4N, s, s, C]` -> `[N, 2s, 2s, C]`: scenes 4i..4i+3 row by row."""
    s = x.shape[1]
    return x.reshape(-1, 2, 2, s, s, x.shape[-1]).transpose(0, 1, 3, 2, 4, 5).reshape(-1, 2 * s, 2 * s, x.shape[-1])


def untile(x):
    s = x.shape[1] // 2
    return x.reshape(-1, 2, s, 2, s, x.shape[-1]).transpose(0, 1, 3, 2, 4, 5).reshape(-1, s, s, x.shape[-1])


def upscale(inputs):
    req = generation.paired_request(config, inputs)  # a text model without prompts: the null text
    return image_utils.to_uint8(generation.run(config, params, req)["images"])


assert np.array_equal(tile(low_res), image_utils.to_uint8(superres.downsample(image_utils.from_uint8(
    tile(originals)), 2 * low)))  # the tiled image's input is the scenes' inputs, tiled
outputs = {"model, tiled 2 x 2 (32 -> 64)": untile(upscale(tile(low_res))),
           "model, one by one (16 -> 32)": upscale(low_res),
           "bicubic": super_resolution.bicubic(low_res, size)}
result = {"step": step, "scenes": n, "sampler": config.sampling.sampler, "steps": config.sampling.steps,
          "eta": config.sampling.eta, "aug_level": config.sampling.aug_level}
for name, out in outputs.items():
    result[name] = {**super_resolution.image_metrics(out, originals, low_res),
                    **super_resolution.shape_rates(out, captions)}
print(json.dumps(result, indent=1))
