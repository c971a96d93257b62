#!/usr/bin/env python
"""vigil's U-Flow against anomalib 2.7's U-Flow on MVTec-layout classes, with one metric code for both.

Sub-commands (run with the peer virtualenv, see run.sh):
  anomalib --class DIR --out DIR [--size 128] [--epochs 60] [--batch 8] [--seed 0] [--loss anomalib|official]
      Trains anomalib's U-Flow (its own flow, loss, optimiser and scheduler) on train/good, with
      MobileNetV2 features.6 + features.13 from the local ImageNet weights behind the trainable
      per-image LayerNorm([C, H, W]) of anomalib's CNN extractor, and writes the test maps and scores
      in the layout `method_maps` (the vigil-bench example) writes.
  metrics --maps DIR --class DIR [--blur SIGMA]
      Image AUROC, pixel AUROC and the exact MVTec AUPRO@0.3 of one maps folder, as one JSON line
      (with --blur, of the maps after a Gaussian blur, as PatchCore post-processes its maps).
  trace --trace DIR --class DIR --out DIR
      Repeats one vigil fit step for step in anomalib's U-Flow (the `uflow_trace` example's output:
      vigil's raw features, initial state and batch order): checks the features against
      torchvision's, the initial latents and log-determinant, the loss of every epoch, and writes
      the maps of the PyTorch-trained model and of vigil's final state run in PyTorch.

anomalib's U-Flow offers only timm ResNets and MS-CaiT as extractors; the MobileNetV2 extractor here
is anomalib's `LayerNormFeatureExtractor` with torchvision's MobileNetV2 in place of timm's ResNet
(same LayerNorm, same frozen backbone in eval mode), so both tools see the same features.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import maps_layout  # noqa: E402  (the maps layout and the metric code both tools are measured with)
from maps_layout import peer  # noqa: E402  (backbone loader, data layout and the MVTec AUPRO)

# torchvision MobileNetV2: features.6 ends stride 8 (32 channels), features.13 stride 16 (96 channels).
TAPS = {6: (32, 8), 13: (96, 16)}


class MobileNetV2LayerNormExtractor(torch.nn.Module):
    """anomalib's LayerNormFeatureExtractor with torchvision MobileNetV2 features.6 + features.13."""

    def __init__(self, input_size) -> None:
        super().__init__()
        self.backbone = peer.mobilenet_v2_backbone().features[: max(TAPS) + 1]
        for p in self.backbone.parameters():
            p.requires_grad = False
        self.channels = [c for c, _ in TAPS.values()]
        self.scale_factors = [s for _, s in TAPS.values()]
        self.scales = range(len(self.scale_factors))
        self.feature_normalizations = torch.nn.ModuleList(
            torch.nn.LayerNorm([c, int(input_size[0] / s), int(input_size[1] / s)], elementwise_affine=True)
            for c, s in TAPS.values()
        )

    def forward(self, img: torch.Tensor) -> list[torch.Tensor]:
        self.backbone.eval()
        features, x = [], img
        with torch.no_grad():
            for i, layer in enumerate(self.backbone):
                x = layer(x)
                if i in TAPS:
                    features.append(x)
        return [norm(f) for norm, f in zip(self.feature_normalizations, features)]


def build_uflow(size: int):
    from anomalib.models import Uflow
    from anomalib.models.image.uflow import torch_model
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    torch_model.get_feature_extractor = lambda _backbone, input_size: MobileNetV2LayerNormExtractor(input_size)
    transform = Compose([Resize((size, size), antialias=True),
                         Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    return Uflow(backbone="mobilenet_v2", flow_steps=4, pre_processor=PreProcessor(transform=transform),
                 post_processor=False, evaluator=False, visualizer=False)


def cmd_anomalib(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    root = Path(args.class_dir)
    model = build_uflow(args.size)
    tf = model.pre_processor.transform
    train, test, _, _ = peer.load_class(root)
    train_x = peer.load_images(train, tf)
    # anomalib's configure_optimizers: Adam 1e-3, weight decay 1e-5, LinearLR(1 -> 0.4 over 25,000),
    # stepped once per epoch as Lightning does by default.
    optimizers, schedulers = model.configure_optimizers()
    optimizer, scheduler = optimizers[0], schedulers[0]
    start = time.perf_counter()
    losses = []
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(args.epochs):
        model.model.train()
        order = torch.randperm(len(train_x), generator=generator)
        epoch_loss = 0.0
        for i in range(0, len(order), args.batch):
            z, ljd = model.model(train_x[order[i:i + args.batch]])
            if args.loss == "official":
                # mtailanian/uflow train.py: ½‖z‖² summed per sample, then the batch mean of (that − ljd).
                per_sample = torch.sum(torch.stack([0.5 * torch.sum(zi ** 2, dim=(1, 2, 3)) for zi in z]), dim=0)
                loss = torch.mean(per_sample - ljd)
            else:
                # anomalib's UFlowLoss sums ½‖z‖² over the batch too, i.e. B × the official z term.
                loss = model.loss(z, ljd)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_loss += float(loss)
        scheduler.step()
        losses.append(epoch_loss)
    fit_s = time.perf_counter() - start
    model.model.eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    test_x = peer.load_images(test, tf)
    maps, index = [], []
    with torch.no_grad():
        for i in range(0, len(test_x), 16):
            batch = model.model(test_x[i:i + 16])
            for score, amap in zip(batch.pred_score.reshape(-1), batch.anomaly_map):
                amap = amap.reshape(1, 1, *amap.shape[-2:]).float()
                path = test[len(index)]
                w, h = Image.open(path).size
                full = torch.nn.functional.interpolate(amap, size=(h, w), mode="bilinear", align_corners=False)
                maps.append(full[0, 0].numpy().astype("<f4"))
                index.append({"path": str(path.relative_to(root)), "score": float(score), "width": w, "height": h})
    maps_layout.write_maps(out, maps, index, fit_s=fit_s, epoch_losses=losses)
    print(json.dumps({"class": root.name, "fit_s": fit_s}), flush=True)


def vigil_state_into_anomalib(model, bag: dict) -> None:
    """Loads a vigil U-Flow state (LayerNorms and flow, as `UflowModel::save` names them) into
    anomalib's UflowModel built by `build_uflow`, so both compute the same function."""
    extractor, flow = model.feature_extractor, model.flow
    with torch.no_grad():
        for l, norm in enumerate(extractor.feature_normalizations):
            norm.weight.copy_(bag[f"features.scale{l}.layer_norm.weight"])
            norm.bias.copy_(bag[f"features.scale{l}.layer_norm.bias"])
        # anomalib names each stage's steps flow{width}_step{s}; vigil's stages are finest first.
        sides = [int(model.input_size[0] / s) for s in extractor.scale_factors]
        nodes = {n.name: n.module for n in flow.node_list if n.module is not None}
        for l, side in enumerate(sides):
            s = 0
            while f"flow.stage{l}.step{s}.permutation" in bag:
                block, prefix = nodes[f"flow{side}_step{s}"], f"flow.stage{l}.step{s}"
                block.subnet[0].weight.copy_(bag[f"{prefix}.subnet_in.weight"])
                block.subnet[0].bias.copy_(bag[f"{prefix}.subnet_in.bias"])
                block.subnet[2].weight.copy_(bag[f"{prefix}.subnet_out.weight"])
                block.subnet[2].bias.copy_(bag[f"{prefix}.subnet_out.bias"])
                block.global_scale.copy_(bag[f"{prefix}.global_scale"].reshape(block.global_scale.shape))
                block.global_offset.copy_(bag[f"{prefix}.global_offset"].reshape(block.global_offset.shape))
                perm = bag[f"{prefix}.permutation"].long()
                c = len(perm)
                w = torch.zeros(c, c)
                w[torch.arange(c), perm] = 1.0  # output channel i takes input channel perm[i], as vigil
                block.w_perm.copy_(w.view(c, c, 1, 1))
                block.w_perm_inv.copy_(w.t().contiguous().view(c, c, 1, 1))
                s += 1


def load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path))


def cmd_trace(args) -> None:
    """Repeats a vigil fit (`uflow_trace` output) in anomalib's U-Flow: same raw features, same
    initial state, same batches, same optimiser and schedule. Prints the checks as JSON lines and
    writes the maps of the PyTorch-trained model (and of vigil's final state run in PyTorch)."""
    torch.set_num_threads(args.threads)
    trace_dir = Path(args.trace)
    trace = json.loads((trace_dir / "trace.json").read_text())
    st = trace["settings"]
    feats = load_safetensors(trace_dir / "features.safetensors")
    levels = len(trace["shapes"])
    train = [feats[f"train.scale{l}"] for l in range(levels)]
    test = [feats[f"test.scale{l}"] for l in range(levels)]
    model = build_uflow(st["input_size"]).model

    def encode(xs):
        return model.encode([norm(x) for norm, x in zip(model.feature_extractor.feature_normalizations, xs)])

    # 1. Features: torchvision's MobileNetV2 on the same images against vigil's.
    root = Path(args.class_dir)
    tf = build_uflow(st["input_size"]).pre_processor.transform
    imgs = peer.load_images([root / p for p in trace["train"][:8]], tf)
    with torch.no_grad():
        x, torch_feats = imgs, []
        for i, layer in enumerate(model.feature_extractor.backbone):
            x = layer(x)
            if i in TAPS:
                torch_feats.append(x)
    for l, tfeat in enumerate(torch_feats):
        ref = train[l][:8]
        print(json.dumps({"check": f"features scale {l}", "max_abs_diff": float((tfeat - ref).abs().max()),
                          "max_abs": float(ref.abs().max())}), flush=True)

    # 2. Forward at the initial state on the first batch.
    vigil_state_into_anomalib(model, load_safetensors(trace_dir / "init.safetensors"))
    first = load_safetensors(trace_dir / "first_batch.safetensors")
    batch = trace["orders"][0][: st["batch_size"]]
    model.train()
    with torch.no_grad():
        z, ljd = encode([t[batch] for t in train])
    for l, zl in enumerate(z):
        ref = first[f"z.scale{l}"]
        print(json.dumps({"check": f"initial z scale {l}", "max_abs_diff": float((zl - ref).abs().max()),
                          "max_abs": float(ref.abs().max())}), flush=True)
    print(json.dumps({"check": "initial log-det", "max_abs_diff": float((ljd - first["log_det"]).abs().max()),
                      "max_abs": float(first["log_det"].abs().max())}), flush=True)

    # 3. Train from the same start on the same batches with vigil's optimiser settings.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=st["learning_rate"], weight_decay=st["weight_decay"])
    batches = trace["batches_per_epoch"]
    total = st["epochs"] * batches
    dims = sum(c * s * s for c, s in trace["shapes"])
    n = train[0].shape[0]
    losses, step = [], 0
    for order in trace["orders"]:
        epoch_total = 0.0
        for b in range(batches):
            members = order[b * st["batch_size"]:(b + 1) * st["batch_size"]]
            z, ljd = encode([t[members] for t in train])
            per_sample = torch.stack([0.5 * torch.sum(zi ** 2, dim=(1, 2, 3)) for zi in z]).sum(0)
            if st["loss"] == "anomalib":
                loss = per_sample.sum() - ljd.mean()  # anomalib's UFlowLoss
            else:
                loss = torch.mean(per_sample - ljd)  # mtailanian/uflow train.py
            for g in optimizer.param_groups:
                g["lr"] = st["learning_rate"] * (1.0 + (st["lr_end_factor"] - 1.0) * step / total)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_total += float(loss) * len(members)
            step += 1
        losses.append(epoch_total / (n * dims))
    vigil_losses = trace["epoch_losses"]
    for e in sorted({0, 1, 4, 9, 19, 39, len(losses) - 1}):
        if e < len(losses):
            print(json.dumps({"check": f"epoch {e} loss per dim", "vigil": vigil_losses[e], "pytorch": losses[e]}),
                  flush=True)

    # 4. Maps of the PyTorch-trained model and of vigil's final state run in PyTorch.
    def write_maps(out: Path) -> None:
        model.eval()
        out.mkdir(parents=True, exist_ok=True)
        maps, index = [], []
        with torch.no_grad():
            for i in range(0, test[0].shape[0], 16):
                z, _ = encode([t[i:i + 16] for t in test])
                amaps = model.anomaly_map_generator(z)
                for amap in amaps:
                    path = trace["test"][len(index)]
                    maps.append(amap[0].numpy().astype("<f4"))
                    index.append({"path": path, "score": float(amap.max()),
                                  "width": amap.shape[-1], "height": amap.shape[-2]})
        maps_layout.write_maps(out, maps, index)

    write_maps(Path(args.out) / "pytorch-trained")
    vigil_state_into_anomalib(model, load_safetensors(trace_dir / "final.safetensors"))
    write_maps(Path(args.out) / "vigil-final-in-pytorch")


def cmd_metrics(args) -> None:
    print(json.dumps(maps_layout.metrics(Path(args.class_dir), Path(args.maps), args.blur)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["anomalib", "metrics", "trace"])
    ap.add_argument("--class", dest="class_dir", required=True)
    ap.add_argument("--out")
    ap.add_argument("--maps")
    ap.add_argument("--trace", help="trace: the uflow_trace output folder")
    ap.add_argument("--blur", type=float, default=0.0,
                    help="metrics: Gaussian blur of each map (sigma in pixels) before scoring; 0 = none")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--loss", choices=["anomalib", "official"], default="anomalib",
                    help="anomalib's UFlowLoss (default) or the official code's per-sample loss")
    args = ap.parse_args()
    {"anomalib": cmd_anomalib, "metrics": cmd_metrics, "trace": cmd_trace}[args.cmd](args)


if __name__ == "__main__":
    main()
