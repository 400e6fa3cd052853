"""Text-guided recolouring by image-to-image, measured on runs/shapes_t2i (docs/text_to_image.md).

The first 200 one-object scenes of the held-out split (or `--scenes`), image i under "a <next
colour> <its shape>" (red -> green -> blue -> yellow -> red), by SDEdit (noise to strength s), DDIM
inversion under the image's own caption, or DiffEdit (that inversion, decoded only inside the mask
where the target prompt and the caption disagree: `--mask=auto`), then 50 DDIM steps (eta 0 unless
--eta) at the run's guidance. Reported: the share of outputs with exactly one object, of the target
colour (shapes_checker), and the share whose object's centre is also within 2 pixels (of 16) of the
input's. `--negative=source`: the image's own caption as the negative prompt (guidance's
unconditional half), so guidance pushes along target minus source (the colour) only.
    python benchmarks/shapes_recolour.py [--workdir=runs/shapes_t2i] [--edits=sdedit,invert,diffedit]
        [--scenes=0:200] [--strengths=0.3,0.5] [--mask_strength=0.5] [--mask_threshold=0.5]
        [--mask_dilation=0] [--eta=0] [--guidance=3] [--guidance_t_min=0] [--negative=null]
"""
import argparse
import dataclasses
import os
import tempfile

import numpy as np

from ddpm_jax import checkpoints, generation, image_utils, scenes
from ddpm_jax.evaluation import shapes_checker, tasks

parser = argparse.ArgumentParser()
parser.add_argument("--workdir", default="runs/shapes_t2i")
parser.add_argument("--edits", default="sdedit,invert,diffedit")
parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise of the decoding (0: deterministic)")
parser.add_argument("--mask_threshold", type=float, default=0.5, help="DiffEdit: sampling.mask_threshold")
parser.add_argument("--mask_dilation", type=int, default=0, help="DiffEdit: sampling.mask_dilation")
parser.add_argument("--mask_strength", type=float, default=0.5, help="DiffEdit: sampling.mask_strength")
parser.add_argument("--guidance", type=float, default=None, help="guidance w (default: the run's)")
parser.add_argument("--guidance_t_min", type=float, default=0.0, help="guide only at t >= this")
parser.add_argument("--scenes", default="0:200", help="which one-object held-out scenes, START:STOP")
parser.add_argument("--strengths", default=None, help="comma-separated strengths instead of each edit's own")
parser.add_argument("--negative", default="null", choices=("null", "source"),
                    help="guidance's unconditional half: the null text, or the image's own caption")
args = parser.parse_args()
EDITS = {"sdedit": [(s, False, False) for s in (0.3, 0.4, 0.5, 0.6, 0.7)],  # (strength, invert, auto mask)
         "invert": [(0.5, True, False), (0.7, True, False)],
         "diffedit": [(0.5, True, True), (0.7, True, True), (1.0, True, True)]}
config = checkpoints.load_config(args.workdir)
params, step = checkpoints.load_params(args.workdir, config)
start, stop = map(int, args.scenes.split(":"))
captions = tasks.captions(config, "test", 5 * stop)  # about half the scenes have one object
real, _ = tasks.real_images(config, "test", 5 * stop)
single = [i for i, c in enumerate(captions) if scenes.parse_caption(c)[1] is None][start:stop]
names = list(scenes.COLOURS)
objects = [scenes.parse_caption(captions[i])[0][0] for i in single]  # (colour, shape)
targets = [f"a {names[(names.index(c) + 1) % 4]} {s}" for c, s in objects]
first = os.path.join(tempfile.mkdtemp(), "in.png")
image_utils.save_png(first, real[single[0]])
settings = [e for name in args.edits.split(",") for e in EDITS[name]]
if args.strengths:
    strengths = [float(s) for s in args.strengths.split(",")]
    settings = list(dict.fromkeys((s, inv, auto) for _, inv, auto in settings for s in strengths))
for strength, invert, auto_mask in settings:
    config.sampling.update(num_samples=1, strength=strength, sampler="ddim", eta=args.eta,
                           mask_threshold=args.mask_threshold, mask_dilation=args.mask_dilation,
                           mask_strength=args.mask_strength, guidance_t_min=args.guidance_t_min)
    if args.guidance is not None:
        config.sampling.guidance = args.guidance
    req = generation.make_request(config, prompts=targets, init_images=first, invert=invert,
                                  given=frozenset({"num_samples", "strength"}), mask="auto" if auto_mask else None,
                                  source_prompt="a red circle" if invert else None)
    source = {**req.cond, **generation.text_cond(config, [captions[i] for i in single], "--source_prompt")}
    req = dataclasses.replace(req, x0=image_utils.from_uint8(real[single]),  # image i under prompt i
                              source_cond=source if invert else None,
                              null_cond=source if args.negative == "source" else None)
    out = image_utils.to_uint8(generation.run(config, params, req)["images"])
    colour_ok, near = [], []
    for k, i in enumerate(single):
        want = targets[k].split()[1]
        src = shapes_checker.detect(real[i])
        found = shapes_checker.detect(out[k])
        ok = {d.colour for d in found} == {want} and len(found) == 1
        colour_ok.append(ok)
        if ok and src:
            near.append(np.abs(np.subtract(found[0].centre, src[0].centre)).max() <= 2)
        else:
            near.append(False)
    what = (f", mask at {args.mask_strength} threshold {args.mask_threshold} dilation {args.mask_dilation}"
            if auto_mask else "")
    what += f", w {config.sampling.guidance:g}" + (f" at t >= {args.guidance_t_min:g}" if args.guidance_t_min else "")
    what += ", negative: the caption" if args.negative == "source" else ""
    print(f"strength {strength}, invert {invert}, DiffEdit mask {auto_mask}{what}: target colour (one object of it, "
          f"nothing else) {np.mean(colour_ok):.1%}, and centre within 2 px {np.mean(near):.1%} of {len(single)}",
          flush=True)
