#!/usr/bin/env python
"""vigil's FastFlow against anomalib 2.7's FastFlow on MVTec-layout classes, with one metric code for both.

Sub-commands (run with the peer virtualenv, see run.sh):
  anomalib --class DIR --out DIR [--size 128] [--epochs 40] [--batch 8] [--seed 0]
      Trains anomalib's FastFlow (its flows, FastflowLoss and configure_optimizers: Adam 1e-3, weight
      decay 1e-5) on train/good with MobileNetV2 features.3 / features.6 / features.13 (strides 4, 8,
      16) from the local ImageNet weights behind anomalib's trainable LayerNorm([C, H, W]) per scale,
      and writes the test maps and scores in the layout `method_maps` (the vigil-bench example) writes.
  metrics --maps DIR --class DIR
      Image AUROC, pixel AUROC and the exact MVTec AUPRO@0.3 of one maps folder, as one JSON line.

anomalib's FastFlow offers only timm ResNet-18 / WRN-50-2 and CaiT / DeiT; here its CNN path is kept
(`_get_cnn_features`: extractor, then `norms[i]`) with torchvision's MobileNetV2 as the extractor, and
`norms` and `fast_flow_blocks` rebuilt for MobileNetV2's channels with anomalib's own
`create_fast_flow_block`, so both tools see the same features and train the same architecture.
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

# torchvision MobileNetV2: features.3 ends stride 4 (24 channels), features.6 stride 8 (32),
# features.13 stride 16 (96): vigil's `cpu` preset taps.
TAPS = {3: (24, 4), 6: (32, 8), 13: (96, 16)}


class MobileNetV2Taps(torch.nn.Module):
    """Frozen torchvision MobileNetV2 (eval mode) returning the TAPS outputs, finest first."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = peer.mobilenet_v2_backbone().features[: max(TAPS) + 1]
        for p in self.backbone.parameters():
            p.requires_grad = False

    def forward(self, img: torch.Tensor) -> list[torch.Tensor]:
        self.backbone.eval()
        features, x = [], img
        with torch.no_grad():
            for i, layer in enumerate(self.backbone):
                x = layer(x)
                if i in TAPS:
                    features.append(x)
        return features


def build_fastflow(size: int, flow_steps: int):
    from anomalib.models import Fastflow
    from anomalib.models.image.fastflow.torch_model import create_fast_flow_block
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    transform = Compose([Resize((size, size), antialias=True),
                         Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    model = Fastflow(backbone="resnet18", pre_trained=False, flow_steps=flow_steps,
                     pre_processor=PreProcessor(transform=transform),
                     post_processor=False, evaluator=False, visualizer=False)
    torch_model = model.model
    torch_model.feature_extractor = MobileNetV2Taps()
    torch_model.norms = torch.nn.ModuleList(
        torch.nn.LayerNorm([c, size // s, size // s], elementwise_affine=True) for c, s in TAPS.values())
    torch_model.fast_flow_blocks = torch.nn.ModuleList(
        create_fast_flow_block([c, size // s, size // s], conv3x3_only=False, hidden_ratio=1.0,
                               flow_steps=flow_steps)
        for c, s in TAPS.values())
    return model


def cmd_anomalib(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # FrEIA draws AllInOneBlock permutations from numpy
    root = Path(args.class_dir)
    model = build_fastflow(args.size, args.flow_steps)
    tf = model.pre_processor.transform
    train, test, _, _ = peer.load_class(root)
    train_x = peer.load_images(train, tf)
    optimizer = model.configure_optimizers()  # Adam(lr=1e-3, weight_decay=1e-5), no scheduler
    start = time.perf_counter()
    losses = []
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(args.epochs):
        model.model.train()
        order = torch.randperm(len(train_x), generator=generator)
        epoch_loss = 0.0
        for i in range(0, len(order), args.batch):
            members = order[i:i + args.batch]
            hidden, jacobians = model.model(train_x[members])
            loss = model.loss(hidden, jacobians)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_loss += float(loss) * len(members)
        losses.append(epoch_loss / len(train_x))
    fit_s = time.perf_counter() - start
    model.model.eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    test_x = peer.load_images(test, tf)
    maps, index = [], []
    score_s = 0.0
    with torch.no_grad():
        for i in range(len(test_x)):
            t0 = time.perf_counter()
            batch = model.model(test_x[i:i + 1])
            score_s += time.perf_counter() - t0
            score, amap = batch.pred_score.reshape(-1)[0], batch.anomaly_map[0]
            amap = amap.reshape(1, 1, *amap.shape[-2:]).float()
            path = test[len(index)]
            w, h = Image.open(path).size
            full = torch.nn.functional.interpolate(amap, size=(h, w), mode="bilinear", align_corners=False)
            maps.append(full[0, 0].numpy().astype("<f4"))
            index.append({"path": str(path.relative_to(root)), "score": float(score), "width": w, "height": h})
    maps_layout.write_maps(out, maps, index, fit_s=fit_s, epoch_losses=losses,
                           score_s_per_image=score_s / max(len(index), 1))
    print(json.dumps({"class": root.name, "fit_s": fit_s}), flush=True)


def cmd_metrics(args) -> None:
    print(json.dumps(maps_layout.metrics(Path(args.class_dir), Path(args.maps))), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["anomalib", "metrics"])
    ap.add_argument("--class", dest="class_dir", required=True)
    ap.add_argument("--out")
    ap.add_argument("--maps")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--flow-steps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    {"anomalib": cmd_anomalib, "metrics": cmd_metrics}[args.cmd](args)


if __name__ == "__main__":
    main()
