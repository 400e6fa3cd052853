"""The PyTorch peer: diffusers' UNet2DModel in the DDPM CIFAR-10 configuration, same work as ours.

Times a DDPM training step (L_simple, Adam 2e-4, global-norm clip 1.0) and 1000-step ancestral
sampling, with bf16 autocast and torch.compile (mode 'reduce-overhead' uses CUDA graphs). Run it on
the same device and in the same invocation as `python -m ddpm_jax.benchmark` (see
benchmarks/run_gpu.sh) so the two can be compared as a ratio. Needs torch and diffusers, which are
benchmark-only dependencies of ddpm_jax. Prints one JSON line per measurement; --out appends them.

  python benchmarks/peer_torch.py --batch 128 --compile_mode reduce-overhead --out peer.jsonl
"""
import argparse
import json
import time

import torch
from diffusers import UNet2DModel


def make_unet(device):
    """Ho et al.'s CIFAR-10 U-Net expressed in diffusers (35,746,307 parameters)."""
    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32, norm_eps=1e-6, dropout=0.1, attention_head_dim=None,
        downsample_padding=0, flip_sin_to_cos=False, freq_shift=1).to(device)


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def bench_train(args, device, abar):
    torch.manual_seed(0)
    model = make_unet(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, fused=device == "cuda")

    def step(x0):
        t = torch.randint(0, 1000, (x0.shape[0],), device=device)
        eps = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16):
            pred = model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t).sample
        loss = torch.nn.functional.mse_loss(pred.float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    if args.compile:
        step = torch.compile(step, mode=args.compile_mode)
    x0 = torch.randn(args.batch, 3, 32, 32, device=device)
    start = time.perf_counter()
    for _ in range(args.warmup):
        step(x0)
    synchronize(device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        step(x0)
    synchronize(device)
    step_s = (time.perf_counter() - start) / args.steps
    return dict(what="train", batch=args.batch, step_s=step_s, images_per_s=args.batch / step_s, warmup_s=warmup_s)


@torch.no_grad()
def bench_sample(args, device, betas, abar):
    model = make_unet(device).eval()
    net = torch.compile(model, mode=args.compile_mode) if args.compile else model
    alphas = (1 - betas).float()
    b32 = betas.float()

    def one(x, i):
        t = torch.full((x.shape[0],), i, device=device, dtype=torch.long)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16):
            eps = net(x, t).sample.float()
        mean = (x - b32[i] / (1 - abar[i]).sqrt() * eps) / alphas[i].sqrt()
        return mean + b32[i].sqrt() * torch.randn_like(x) if i > 0 else mean

    x = torch.randn(args.sample_n, 3, 32, 32, device=device)
    for i in range(3):  # compile / capture
        x = one(x, args.sample_steps - 1 - i)
    synchronize(device)
    start = time.perf_counter()
    for i in reversed(range(args.sample_steps)):
        x = one(x, i)
    synchronize(device)
    total = time.perf_counter() - start
    return dict(what="sample", n=args.sample_n, steps=args.sample_steps, total_s=total,
                images_per_s=args.sample_n / total)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=30, help="timed train steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sample_n", type=int, default=256)
    p.add_argument("--sample_steps", type=int, default=1000)
    p.add_argument("--no_bf16", dest="bf16", action="store_false")
    p.add_argument("--no_compile", dest="compile", action="store_false")
    p.add_argument("--compile_mode", default="reduce-overhead", help="torch.compile mode ('' for default)")
    p.add_argument("--skip", default="", help="comma-separated: train,sample")
    p.add_argument("--out", default="", help="append JSON lines here")
    args = p.parse_args()
    args.compile_mode = (args.compile_mode or None) if args.compile else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    betas = torch.linspace(1e-4, 0.02, 1000, device=device, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0).float()
    common = dict(system="diffusers UNet2DModel (PyTorch)", torch=torch.__version__, bf16=args.bf16,
                  compiled=args.compile, compile_mode=args.compile_mode,
                  device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                  params=sum(p.numel() for p in make_unet("cpu").parameters()))
    for name, fn in [("train", lambda: bench_train(args, device, abar)),
                     ("sample", lambda: bench_sample(args, device, betas, abar))]:
        if name in args.skip.split(","):
            continue
        try:
            rec = {**common, **fn()}
        except Exception as e:  # report and go on: one failing mode must not hide the other
            rec = {**common, "what": name, "error": repr(e)[:300]}
        line = json.dumps(rec)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
