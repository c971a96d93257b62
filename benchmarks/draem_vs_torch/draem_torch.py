"""DRAEM / DRAEM-UNet++ in PyTorch, timed the same way as
`cargo run --release -p vigil-draem --example bench_draem`: one training step (joint loss
L2 + (1 - SSIM) + focal, Adam) and the inference of one image.

The DRAEM networks are written from the official definition (VitjanZ/DRAEM `model_unet.py`),
not from vigil's code, so that `run.sh`'s value-count check compares vigil with the original:
the layer widths below are the official ones, transcribed as tables. The CPU preset (fewer
poolings, narrower) is not in the official code; for it the tables follow the rule vigil
documents (methods/draem/README.md), and the script checks that this rule gives back the
official tables at the official depths. The UNet++ network has no official code; it mirrors
methods/draem/src/nets.rs (seed 000's description).

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
    # DraemSettings' paper and cpu presets in methods/draem/src/lib.rs.
    "paper": dict(recon_width=128, recon_depth=4, nested_width=32, nested_depth=4, disc_width=64, disc_depth=5),
    "cpu": dict(recon_width=8, recon_depth=3, nested_width=4, nested_depth=3, disc_width=8, disc_depth=4),
}

# model_unet.py, in multiples of base_width.
# EncoderReconstructive block1..block5 / EncoderDiscriminative block1..block6: output widths.
OFFICIAL_RECON_ENCODER = [1, 2, 4, 8, 8]
OFFICIAL_DISC_ENCODER = [1, 2, 4, 8, 8, 8]
# DecoderReconstructive (up_k conv in->in; db_k conv in->in, conv in->out): (in, out) per stage.
OFFICIAL_RECON_DECODER = [(8, 4), (4, 2), (2, 1), (1, 1)]
# DecoderDiscriminative (up conv in->out; db conv (out + skip)->out, conv out->out): (in, out, skip).
OFFICIAL_DISC_DECODER = [(8, 8, 8), (8, 4, 8), (4, 2, 4), (2, 1, 2), (1, 1, 1)]


def encoder_widths(depth):
    return [min(2 ** level, 8) for level in range(depth + 1)]


def decoder_width(level):
    return 1 if level == 0 else min(2 ** (level - 1), 8)


def recon_decoder(depth):
    stages, width = [], encoder_widths(depth)[-1]
    for level in reversed(range(depth)):
        stages.append((width, decoder_width(level)))
        width = decoder_width(level)
    return stages


def disc_decoder(depth):
    enc, stages, width = encoder_widths(depth), [], encoder_widths(depth)[-1]
    for level in reversed(range(depth)):
        stages.append((width, decoder_width(level), enc[level]))
        width = decoder_width(level)
    return stages


assert encoder_widths(4) == OFFICIAL_RECON_ENCODER and encoder_widths(5) == OFFICIAL_DISC_ENCODER
assert recon_decoder(4) == OFFICIAL_RECON_DECODER and disc_decoder(5) == OFFICIAL_DISC_DECODER


def tables(depth, official_depth, official, derived):
    """The official table at the official depth, the documented rule elsewhere."""
    return official if depth == official_depth else derived(depth)


def conv_bn_relu(cin, cout):
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def double_conv(cin, mid, cout):
    return nn.Sequential(*conv_bn_relu(cin, mid), *conv_bn_relu(mid, cout))


def up_conv(cin, cout):
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), *conv_bn_relu(cin, cout))


class ReconstructiveSubNetwork(nn.Module):
    """Plain encoder-decoder, no skips (model_unet.py)."""

    def __init__(self, channels, base, depth):
        super().__init__()
        enc = [w * base for w in tables(depth, 4, OFFICIAL_RECON_ENCODER, encoder_widths)]
        self.encoder = nn.ModuleList(
            [double_conv(cin, cout, cout) for cin, cout in zip([channels] + enc[:-1], enc)])
        dec = tables(depth, 4, OFFICIAL_RECON_DECODER, recon_decoder)
        self.up = nn.ModuleList([up_conv(i * base, i * base) for i, _ in dec])
        self.db = nn.ModuleList([double_conv(i * base, i * base, o * base) for i, o in dec])
        self.fin_out = nn.Conv2d(dec[-1][1] * base, channels, 3, padding=1)

    def forward(self, x):
        for level, block in enumerate(self.encoder):
            x = block(x if level == 0 else F.max_pool2d(x, 2))
        for up, db in zip(self.up, self.db):
            x = db(up(x))
        return self.fin_out(x)


class DiscriminativeSubNetwork(nn.Module):
    """U-Net with skips (model_unet.py)."""

    def __init__(self, cin, cout, base, depth):
        super().__init__()
        enc = [w * base for w in tables(depth, 5, OFFICIAL_DISC_ENCODER, encoder_widths)]
        self.encoder = nn.ModuleList([double_conv(i, o, o) for i, o in zip([cin] + enc[:-1], enc)])
        dec = tables(depth, 5, OFFICIAL_DISC_DECODER, disc_decoder)
        self.up = nn.ModuleList([up_conv(i * base, o * base) for i, o, _ in dec])
        self.db = nn.ModuleList([double_conv((o + s) * base, o * base, o * base) for _, o, s in dec])
        self.fin_out = nn.Conv2d(dec[-1][1] * base, cout, 3, padding=1)

    def forward(self, x):
        skips = []
        for level, block in enumerate(self.encoder):
            x = block(x if level == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for up, db in zip(self.up, self.db):
            x = db(torch.cat([up(x), skips.pop()], 1))
        return self.fin_out(x)


def up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class VggBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2),
                                  nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2))

    def forward(self, x):
        return self.body(x)


class NestedUNet(nn.Module):
    def __init__(self, ch, base, depth):
        super().__init__()
        self.depth = depth
        self.order = [(i, j) for j in range(depth + 1) for i in range(depth + 1 - j)]
        w = lambda i: base << i
        nodes = []
        for i, j in self.order:
            cin = ch if (i, j) == (0, 0) else (w(i - 1) if j == 0 else w(i) * j + w(i + 1))
            nodes.append(VggBlock(cin, w(i)))
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
            self.reconstructive = ReconstructiveSubNetwork(3, p["recon_width"], p["recon_depth"])
        else:
            self.reconstructive = NestedUNet(3, p["nested_width"], p["nested_depth"])
        self.discriminative = DiscriminativeSubNetwork(6, 2, p["disc_width"], p["disc_depth"])

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
