"""PyTorch side of the U-Net timing: one training step and one DDAD reconstruction (10
conditioned DDIM steps) of a preset, timed as `cargo run --release -p vigil-diffusion --example
time_unet -- <preset> <batch> <repeats>` times vigil's.

usage: python time_unet_torch.py <preset> <batch> <repeats> [--official path/to/DDAD/unet.py]

The network is DDAD's `UNetModel` when --official is given (read from a checkout of
arimousa/DDAD; not vendored), else the re-statement in ../tests/fixtures/make_golden_unet.py.
The training step is `train.py`'s (Adam lr 3e-4, weight decay 0.05; `loss.py`'s loss), the
reconstruction `reconstruction.py`'s (t 250, skip 25, eta 1, w 2). Threads: 2 unless
VIGIL_BENCH_THREADS is set. Prints one JSON line.
"""
import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np
import torch

PRESETS = {
    # UNetSettings::{ddad, ddad_s, cpu} in crates/diffusion/src/unet.rs.
    "ddad": dict(img_size=256, base_channels=64, channel_mults=(1, 1, 2, 2, 4, 4), num_res_blocks=2, n_heads=4,
                 attention_resolutions="32,16,8", dropout=0.0),
    "ddad-s": dict(img_size=256, base_channels=32, channel_mults=(1, 1, 2, 2, 4, 4), num_res_blocks=2, n_heads=2,
                   attention_resolutions="32,16,8", dropout=0.3),
    "cpu": dict(img_size=64, base_channels=32, channel_mults=(1, 1, 2, 2), num_res_blocks=1, n_heads=2,
                attention_resolutions="16,8", dropout=0.0),
}


def build(preset, official):
    c = dict(PRESETS[preset], in_channels=3)
    if official:
        spec = importlib.util.spec_from_file_location("ddad_unet", official)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.UNetModel(c["img_size"], c["base_channels"], n_heads=c["n_heads"],
                                channel_mults=c["channel_mults"], num_res_blocks=c["num_res_blocks"],
                                dropout=c["dropout"], attention_resolutions=c["attention_resolutions"],
                                in_channels=3)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
    from make_golden_unet import ReUNet
    if c["dropout"] != 0.0:
        raise SystemExit("the re-statement has no dropout; use --official for ddad-s")
    return ReUNet(**c)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("batch", type=int)
    parser.add_argument("repeats", type=int)
    parser.add_argument("--official")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("VIGIL_BENCH_THREADS", "2")))
    torch.manual_seed(0)
    size = PRESETS[args.preset]["img_size"]
    net = build(args.preset, args.official)
    betas = torch.tensor(np.linspace(1e-4, 0.02, 1000, dtype=np.float64)).type(torch.float)
    alpha_bars = (1 - betas).cumprod(dim=0)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-4, weight_decay=0.05)
    x0 = torch.rand(args.batch, 3, size, size) * 2 - 1

    def train_step():
        optimizer.zero_grad()
        t = torch.randint(0, 1000, (args.batch,)).long()
        e = torch.randn_like(x0)
        at = alpha_bars.index_select(0, t).view(-1, 1, 1, 1)
        x = at.sqrt() * x0 + (1 - at).sqrt() * e
        loss = (e - net(x, t.float())).square().sum(dim=(1, 2, 3)).mean(dim=0)
        loss.backward()
        optimizer.step()

    net.train()
    train_step()
    start = time.perf_counter()
    for _ in range(args.repeats):
        train_step()
    train_seconds = (time.perf_counter() - start) / args.repeats

    padded = torch.cat([torch.ones(1), alpha_bars])
    alpha = lambda t: padded[t + 1]  # noqa: E731  (reconstruction.py's _compute_alpha: t = -1 gives 1)
    image = x0[:1]

    def reconstruct():
        with torch.no_grad():
            at = alpha(250)
            xt = at.sqrt() * image + (1 - at).sqrt() * torch.randn_like(image)
            seq = list(range(0, 250, 25))
            for i, j in zip(reversed(seq), reversed([-1] + seq[:-1])):
                at, at_next = alpha(i), alpha(j)
                et = net(xt, torch.full((1,), float(i)))
                yt = at.sqrt() * image + (1 - at).sqrt() * et
                et_hat = et - (1 - at).sqrt() * 2.0 * (yt - xt)
                x0_t = (xt - et_hat * (1 - at).sqrt()) / at.sqrt()
                c1 = ((1 - at / at_next) * (1 - at_next) / (1 - at)).sqrt()
                c2 = ((1 - at_next) - c1 ** 2).sqrt()
                xt = at_next.sqrt() * x0_t + c1 * torch.randn_like(image) + c2 * et_hat
        return xt

    net.eval()
    reconstruct()
    start = time.perf_counter()
    for _ in range(args.repeats):
        reconstruct()
    reconstruction_seconds = (time.perf_counter() - start) / args.repeats
    print(json.dumps(dict(preset=args.preset, batch=args.batch, threads=torch.get_num_threads(),
                          parameters=sum(p.numel() for p in net.parameters()),
                          train_step_s=round(train_seconds, 4), reconstruction_s=round(reconstruction_seconds, 4),
                          network="official unet.py" if args.official else "re-statement")))


if __name__ == "__main__":
    main()
