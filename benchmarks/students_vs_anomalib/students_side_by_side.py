#!/usr/bin/env python
"""vigil's STFPM and Reverse Distillation against anomalib 2.7's on MVTec-layout classes, with one metric
code for both.

Sub-commands (run with the peer virtualenv, see run.sh):
  anomalib --class DIR --out DIR --backbone {mobilenet_v2,efficientnet_lite0} [--method stfpm|reverse_distillation]
           [--size 128] [--epochs 40] [--batch 8] [--seed 0] [--threads 2]
      stfpm: trains anomalib's STFPM (its STFPMModel forward and anomaly map, STFPMLoss and
      configure_optimizers: SGD lr 0.4, momentum 0.9, weight decay 1e-3) on train/good, with the teacher
      and the student swapped for the same torchvision-named network vigil uses: the teacher with the
      local ImageNet weights (frozen, eval mode), the student randomly initialised (torchvision's
      init), both returning the taps at strides 4/8/16 of vigil's `cpu` preset.
      reverse_distillation: trains anomalib's Reverse Distillation (its ReverseDistillationModel forward
      and anomaly map (mode add, sigma 4), ReverseDistillationLoss and configure_optimizers: Adam lr 0.005,
      betas (0.5, 0.99)) with the encoder swapped for the same frozen network as vigil's, and anomalib's
      own OCBE and ResNetDecoder (basic blocks, as for resnet18) built at the encoder taps' widths, as
      vigil's bottleneck and decoder are.
      Both write the test maps and scores in the layout vigil's `method_maps` example writes.
  metrics --maps DIR --class DIR
      Image AUROC, pixel AUROC, the exact MVTec AUPRO@0.3 and pixel AP of one maps folder, as one JSON line
      (benchmarks/maps_layout.py, the metric code of every side-by-side script).

anomalib builds its teacher and student with timm (`TimmFeatureExtractor`), whose MobileNetV2 and
EfficientNet-Lite0 are other implementations with other weights; the extractors are replaced here so
both tools train the same student against the same teacher (the rest is anomalib's code).
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
import torch.nn.functional as F
from PIL import Image
from torch import nn

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent.parent / "shared"
sys.path.insert(0, str(HERE.parent))
from maps_layout import metrics, peer, write_maps  # noqa: E402  (the maps layout and the one metric code)

# The taps of vigil's `cpu` preset (strides 4, 8, 16) and each backbone's input normalisation.
TAPS = {
    "mobilenet_v2": ["features.3", "features.6", "features.13"],
    "efficientnet_lite0": ["_blocks.2", "_blocks.4", "_blocks.10"],
}
NORMALIZATION = {
    "mobilenet_v2": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    "efficientnet_lite0": ([0.5] * 3, [0.5] * 3),
}
# EfficientNet-Lite0 stages: (repeats, kernel, first stride, expansion, input channels, output channels).
LITE0_BLOCKS = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]


class Conv2dSame(nn.Conv2d):
    """TensorFlow "SAME" padding (the odd pixel at the bottom/right), as EfficientNet-Lite was trained."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        x = F.pad(x, [pads[1][0], pads[1][1], pads[0][0], pads[0][1]])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    """lukemelas/ml-illustrated MBConv without squeeze-excite (EfficientNet-Lite), ReLU6."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.expand = expansion != 1
        if self.expand:
            self._expand_conv = Conv2dSame(cin, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=1e-3)
        self._depthwise_conv = Conv2dSame(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=1e-3)
        self._project_conv = Conv2dSame(hidden, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=1e-3)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 up to `_blocks.{last}` with the names of the shared weights."""

    def __init__(self, last: int) -> None:
        super().__init__()
        self._conv_stem = Conv2dSame(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
        blocks = []
        for repeats, kernel, stride, expansion, cin, cout in LITE0_BLOCKS:
            for r in range(repeats):
                blocks.append(MBConv(cin if r == 0 else cout, cout, kernel, stride if r == 0 else 1, expansion))
        self._blocks = nn.ModuleList(blocks[: last + 1])
        for m in self.modules():  # torchvision's initialisation, as vigil's student
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stages(self):
        yield "_conv_stem", nn.Sequential(self._conv_stem, self._bn0, nn.ReLU6())
        for i, block in enumerate(self._blocks):
            yield f"_blocks.{i}", block


class Extractor(nn.Module):
    """A network's tap outputs as the dict anomalib's STFPMModel expects from TimmFeatureExtractor;
    frozen (eval mode, no gradients) like anomalib's teacher, or trainable like its student."""

    def __init__(self, backbone: str, pretrained: bool) -> None:
        super().__init__()
        self.taps = TAPS[backbone]
        self.frozen = pretrained
        if backbone == "mobilenet_v2":
            import torchvision

            net = peer.mobilenet_v2_backbone() if pretrained else torchvision.models.mobilenet_v2(weights=None)
            last = int(self.taps[-1].split(".")[1])
            self.net = net.features[: last + 1]
            self.named = lambda: ((f"features.{i}", m) for i, m in enumerate(self.net))
        else:
            from safetensors.torch import load_file

            self.net = EfficientNetLite0(int(self.taps[-1].split(".")[1]))
            if pretrained:
                state = load_file(str(SHARED / "weights/efficientnet_lite0/efficientnet_lite0.safetensors"))
                kept = {k: v for k, v in state.items() if k in self.net.state_dict()}
                missing, _ = self.net.load_state_dict(kept, strict=False)
                assert all(k.endswith("num_batches_tracked") for k in missing), missing
            self.named = self.net.stages
        for p in self.net.parameters():
            p.requires_grad = not pretrained

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.frozen:
            self.net.eval()
            with torch.no_grad():
                return self._run(x)
        return self._run(x)

    def _run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, module in self.named():
            x = module(x)
            if name in self.taps:
                out[name] = x
        return out


def build_stfpm(backbone: str):
    from anomalib.models import Stfpm
    from anomalib.models.image.stfpm import torch_model

    # STFPMModel builds timm extractors (downloading pretrained weights); build it with a
    # placeholder, then put the shared-weight teacher and the same-architecture student in.
    real = torch_model.TimmFeatureExtractor
    torch_model.TimmFeatureExtractor = lambda **_: nn.Identity()
    try:
        model = Stfpm(backbone="resnet18", layers=TAPS[backbone], pre_processor=False,
                      post_processor=False, evaluator=False, visualizer=False)
    finally:
        torch_model.TimmFeatureExtractor = real
    model.model.teacher_model = Extractor(backbone, pretrained=True)
    model.model.student_model = Extractor(backbone, pretrained=False)
    return model


def build_reverse_distillation(backbone: str, size: int):
    """anomalib's ReverseDistillation with the shared-weight encoder, and anomalib's OCBE and
    ResNetDecoder classes re-sized to the encoder's tap widths (c1, c2, c3): anomalib's hard-coded
    ResNet-18 widths (64, 128, 256) replaced, the layers built by their own `_make_layer`, then
    anomalib's initialisation loop run again over them."""
    from anomalib.models import ReverseDistillation
    from anomalib.models.components.backbone.resnet_decoder import DecoderBasicBlock, ResNetDecoder
    from anomalib.models.image.reverse_distillation import torch_model
    from anomalib.models.image.reverse_distillation.components.bottleneck import OCBE
    from torchvision.models.resnet import BasicBlock, conv3x3

    real = torch_model.TimmFeatureExtractor
    torch_model.TimmFeatureExtractor = lambda **_: nn.Identity()
    try:
        # Its constructor takes the input size from a pre-processor (never called here: the
        # images are resized and normalised as for STFPM); the model is rebuilt at `size` below.
        model = ReverseDistillation(backbone="resnet18", layers=TAPS[backbone], post_processor=False,
                                    evaluator=False, visualizer=False)
        model.model = torch_model.ReverseDistillationModel(
            backbone="resnet18", input_size=(size, size), layers=TAPS[backbone],
            anomaly_map_mode=model.anomaly_map_mode, pre_trained=False)
    finally:
        torch_model.TimmFeatureExtractor = real
    encoder = Extractor(backbone, pretrained=True)
    with torch.no_grad():
        widths = [f.shape[1] for f in encoder(torch.zeros(1, 3, size, size)).values()]
    c1, c2, c3 = widths

    def initialise(module: nn.Module) -> None:  # the loop of OCBE.__init__ and ResNetDecoder.__init__
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    bottleneck = OCBE(BasicBlock, 2)
    bottleneck.conv1, bottleneck.bn1 = conv3x3(c1, c2, 2), nn.BatchNorm2d(c2)
    bottleneck.conv2, bottleneck.bn2 = conv3x3(c2, c3, 2), nn.BatchNorm2d(c3)
    bottleneck.conv3, bottleneck.bn3 = conv3x3(c2, c3, 2), nn.BatchNorm2d(c3)
    del bottleneck.conv4, bottleneck.bn4  # unused by OCBE.forward
    bottleneck.inplanes = c3  # _make_layer's first block takes 3 * inplanes channels
    bottleneck.bn_layer = bottleneck._make_layer(BasicBlock, 2 * c3, 2, stride=2)
    initialise(bottleneck)
    decoder = ResNetDecoder(DecoderBasicBlock, [2, 2, 2, 2])
    decoder.inplanes = 2 * c3
    decoder.layer1 = decoder._make_layer(DecoderBasicBlock, c3, 2, stride=2)
    decoder.layer2 = decoder._make_layer(DecoderBasicBlock, c2, 2, stride=2)
    decoder.layer3 = decoder._make_layer(DecoderBasicBlock, c1, 2, stride=2)
    initialise(decoder)
    model.model.encoder, model.model.bottleneck, model.model.decoder = encoder, bottleneck, decoder
    return model


def preprocess(backbone: str, size: int):
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    mean, std = NORMALIZATION[backbone]
    # vigil resizes without antialiasing (PyTorch's interpolate); the same here.
    return Compose([Resize((size, size), antialias=False), Normalize(mean=mean, std=std)])


def cmd_anomalib(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    root = Path(args.class_dir)
    if args.method == "stfpm":
        model = build_stfpm(args.backbone)
    else:
        model = build_reverse_distillation(args.backbone, args.size)
    tf = preprocess(args.backbone, args.size)
    train, test, _, _ = peer.load_class(root)
    train_x = peer.load_images(train, tf)
    # STFPM: SGD(lr=0.4, momentum=0.9, weight_decay=1e-3); RD: Adam(lr=0.005, betas=(0.5, 0.99)).
    optimizer = model.configure_optimizers()
    start = time.perf_counter()
    losses = []
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(args.epochs):
        model.model.train()
        order = torch.randperm(len(train_x), generator=generator)
        epoch_loss = 0.0
        for i in range(0, len(order), args.batch):
            members = order[i:i + args.batch]
            # (teacher, student) for STFPM, (encoder, decoder) features for RD.
            loss = model.loss(*model.model(train_x[members]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # STFPM's loss sums over the batch, RD's is the batch mean.
            epoch_loss += float(loss) * (1 if args.method == "stfpm" else len(members))
        losses.append(epoch_loss / len(train_x))
    fit_s = time.perf_counter() - start
    model.model.eval()
    out = Path(args.out)
    test_x = peer.load_images(test, tf)
    maps, index, score_s = [], [], 0.0
    with torch.no_grad():
        for i, path in enumerate(test):
            t0 = time.perf_counter()
            batch = model.model(test_x[i:i + 1])
            score_s += time.perf_counter() - t0
            amap = batch.anomaly_map.reshape(1, 1, *batch.anomaly_map.shape[-2:]).float()
            w, h = Image.open(path).size
            full = F.interpolate(amap, size=(h, w), mode="bilinear", align_corners=False)
            maps.append(full[0, 0].numpy().astype("<f4"))
            index.append({"path": str(path.relative_to(root)), "score": float(batch.pred_score.reshape(-1)[0]),
                          "width": w, "height": h})
    write_maps(out, maps, index, fit_s=fit_s, epoch_losses=losses, score_s_per_image=score_s / max(len(index), 1))
    print(json.dumps({"class": root.name, "fit_s": fit_s}), flush=True)


def cmd_metrics(args) -> None:
    print(json.dumps(metrics(Path(args.class_dir), Path(args.maps))), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["anomalib", "metrics"])
    ap.add_argument("--class", dest="class_dir", required=True)
    ap.add_argument("--out")
    ap.add_argument("--maps")
    ap.add_argument("--backbone", choices=sorted(TAPS), default="mobilenet_v2")
    ap.add_argument("--method", choices=["stfpm", "reverse_distillation"], default="stfpm")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    {"anomalib": cmd_anomalib, "metrics": cmd_metrics}[args.cmd](args)


if __name__ == "__main__":
    main()
