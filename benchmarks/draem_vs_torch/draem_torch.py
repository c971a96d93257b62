"""DRAEM / DRAEM-UNet++ in PyTorch, layer for layer the networks of methods/draem/src/nets.rs
(same module names, so a state_dict maps 1:1 onto vigil's TensorBag), timed the same way as
`cargo run --release -p vigil-draem --example bench_draem`: one training step (joint loss
L2 + (1 - SSIM) + focal, Adam) and the inference of one image.

usage: python draem_torch.py <cpu|paper> <draem|unetpp> <size> [reps] [batch]
Prints one JSON line. Threads: torch.set_num_threads(2) unless VIGIL_BENCH_THREADS is set.
"""
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {
    # Mirrors DraemSettings::paper / DraemSettings::cpu in methods/draem/src/lib.rs.
    "paper": dict(recon_width=128, recon_depth=4, nested_width=32, nested_depth=4, disc_width=64, disc_depth=5),
    "cpu": dict(recon_width=8, recon_depth=3, nested_width=4, nested_depth=3, disc_width=8, disc_depth=4),
}


def enc_width(base, level):
    return base * (1 << min(level, 3))


def dec_width(base, level):
    return base if level == 0 else base * (1 << min(level - 1, 3))


class ConvBnAct(nn.Module):
    def __init__(self, cin, cout, slope):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn = nn.BatchNorm2d(cout)
        self.slope = slope

    def forward(self, x):
        y = self.bn(self.conv(x))
        return F.relu(y) if self.slope == 0 else F.leaky_relu(y, self.slope)


class DoubleConv(nn.Module):
    def __init__(self, cin, cout, slope):
        super().__init__()
        self.a = ConvBnAct(cin, cout, slope)
        self.b = ConvBnAct(cout, cout, slope)

    def forward(self, x):
        return self.b(self.a(x))


def up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class Autoencoder(nn.Module):
    def __init__(self, ch, base, depth):
        super().__init__()
        self.encoder = nn.ModuleList([DoubleConv(ch, base, 0)] + [
            DoubleConv(enc_width(base, l - 1), enc_width(base, l), 0) for l in range(1, depth + 1)])
        self.up, self.decoder = nn.ModuleList(), nn.ModuleList()
        width = enc_width(base, depth)
        for l in reversed(range(depth)):
            self.up.append(ConvBnAct(width, width, 0))
            self.decoder.append(DoubleConv(width, dec_width(base, l), 0))
            width = dec_width(base, l)
        self.out = nn.Conv2d(width, ch, 3, padding=1)

    def forward(self, x):
        sizes, h = [], x
        for l, block in enumerate(self.encoder):
            if l > 0:
                sizes.append(h.shape[-2:])
                h = F.max_pool2d(h, 2)
            h = block(h)
        for u, block in zip(self.up, self.decoder):
            h = block(u(up(h, sizes.pop())))
        return self.out(h)


class UNet(nn.Module):
    def __init__(self, cin, cout, base, depth):
        super().__init__()
        self.encoder = nn.ModuleList([DoubleConv(cin, base, 0)] + [
            DoubleConv(enc_width(base, l - 1), enc_width(base, l), 0) for l in range(1, depth + 1)])
        self.up, self.decoder = nn.ModuleList(), nn.ModuleList()
        width = enc_width(base, depth)
        for l in reversed(range(depth)):
            d = dec_width(base, l)
            self.up.append(ConvBnAct(width, d, 0))
            self.decoder.append(DoubleConv(d + enc_width(base, l), d, 0))
            width = d
        self.out = nn.Conv2d(width, cout, 3, padding=1)

    def forward(self, x):
        skips, h = [], x
        for l, block in enumerate(self.encoder):
            if l > 0:
                h = F.max_pool2d(h, 2)
            h = block(h)
            skips.append(h)
        skips.pop()
        for u, block in zip(self.up, self.decoder):
            skip = skips.pop()
            h = block(torch.cat([u(up(h, skip.shape[-2:])), skip], 1))
        return self.out(h)


class NestedUNet(nn.Module):
    def __init__(self, ch, base, depth):
        super().__init__()
        self.depth = depth
        self.order = [(i, j) for j in range(depth + 1) for i in range(depth + 1 - j)]
        w = lambda i: base << i
        nodes = []
        for i, j in self.order:
            cin = ch if (i, j) == (0, 0) else (w(i - 1) if j == 0 else w(i) * j + w(i + 1))
            nodes.append(DoubleConv(cin, w(i), 0.2))
        self.nodes = nn.ModuleList(nodes)
        self.out = nn.Conv2d(base, ch, 1)

    def forward(self, x):
        outs = [[] for _ in range(self.depth + 1)]
        for (i, j), node in zip(self.order, self.nodes):
            if j == 0:
                y = node(x if i == 0 else F.max_pool2d(outs[i - 1][0], 2))
            else:
                y = node(torch.cat(outs[i][:j] + [up(outs[i + 1][j - 1], outs[i][0].shape[-2:])], 1))
            outs[i].append(y)
        return self.out(outs[0][-1])


class DraemNet(nn.Module):
    def __init__(self, variant, p):
        super().__init__()
        if variant == "draem":
            self.reconstructive = Autoencoder(3, p["recon_width"], p["recon_depth"])
        else:
            self.reconstructive = NestedUNet(3, p["nested_width"], p["nested_depth"])
        self.discriminative = UNet(6, 2, p["disc_width"], p["disc_depth"])

    def forward(self, x):
        rec = self.reconstructive(x)
        return rec, self.discriminative(torch.cat([rec, x], 1))


def gaussian_window(channels):
    g = torch.tensor([math.exp(-((i - 5) ** 2) / (2 * 1.5 ** 2)) for i in range(11)])
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, 11, 11).contiguous()


def ssim_loss(a, b, window):
    c = a.shape[1]
    blur = lambda t: F.conv2d(t, window, padding=5, groups=c)
    mu_a, mu_b = blur(a), blur(b)
    va, vb, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (va + vb + c2))
    return 1 - s.mean()


def focal_loss(logits, target, gamma=2.0, smooth=1e-5):
    p = torch.softmax(logits, 1)
    t1 = target.clamp(smooth, 1 - smooth)
    t0 = (1 - target).clamp(smooth, 1 - smooth)
    pt = t0 * p[:, :1] + t1 * p[:, 1:] + smooth
    return (-(1 - pt) ** gamma * pt.log()).mean()


def main():
    preset, variant, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    reps = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    batch = int(sys.argv[5]) if len(sys.argv) > 5 else 8
    torch.set_num_threads(int(os.environ.get("VIGIL_BENCH_THREADS", "2")))
    torch.manual_seed(0)
    net = DraemNet(variant, PRESETS[preset])
    params = sum(t.numel() for n, t in net.state_dict().items() if not n.endswith("num_batches_tracked"))
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    window = gaussian_window(3)
    x = torch.rand(batch, 3, size, size)
    clean = torch.rand(batch, 3, size, size)
    mask = (torch.rand(batch, 1, size, size) > 0.9).float()

    net.train()
    train_ms = []
    for rep in range(reps + 1):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        rec, logits = net(x)
        loss = F.mse_loss(rec, clean) + ssim_loss(rec, clean, window) + focal_loss(logits, mask)
        loss.backward()
        opt.step()
        assert math.isfinite(loss.item())
        if rep > 0:
            train_ms.append((time.perf_counter() - t) * 1e3)

    net.eval()
    infer_ms = []
    image = x[:1]
    with torch.inference_mode():
        for rep in range(reps + 1):
            t = time.perf_counter()
            _, logits = net(image)
            prob = torch.softmax(logits, 1)[:, 1:]
            score = F.avg_pool2d(prob, 21, stride=1, padding=10).max().item()
            assert math.isfinite(score)
            if rep > 0:
                infer_ms.append((time.perf_counter() - t) * 1e3)

    med = lambda v: sorted(v)[len(v) // 2]
    print(json.dumps({"framework": "pytorch", "torch": torch.__version__, "preset": preset, "variant": variant,
                      "size": size, "batch": batch, "params": params, "train_ms": med(train_ms),
                      "infer_ms": med(infer_ms)}))


if __name__ == "__main__":
    main()
