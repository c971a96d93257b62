"""Writes the golden fixtures of vigil's MAE (methods/mae/tests/golden.rs) from the reference
PyTorch network: He et al.'s MaskedAutoencoderViT (facebookresearch/mae models_mae.py) rebuilt
here on timm's PatchEmbed and Block, the modules the official code imports, with the official
state_dict names, masking, decoder and loss.

Run from the repository root with a Python that has torch, timm, numpy and safetensors (the peers
venv of ../shared/peers/install.sh has them):

    .peer-venv/bin/python methods/mae/tests/make_golden.py

It writes, next to itself:
- golden.safetensors: seeded random weights of a tiny MAE (32 px, patch 8, width 64, 2 blocks;
  decoder width 32, 1 block) under "model.", and under "golden." an input batch, the masking noise,
  the encoder output, the decoder predictions and the loss (pixel and normalised-pixel targets)
  for that noise, and the predictions for a given mask (one of the four sliding 2x2 masks).
- official_format.pth: an even smaller MAE saved as the official checkpoints are
  ({"model": state_dict}, torch.save's zip format) with its expected predictions under "golden".
"""

import os
from functools import partial

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.models.vision_transformer import Block, PatchEmbed

HERE = os.path.dirname(os.path.abspath(__file__))


def sincos_1d(dim, positions):
    """[sin(p w), cos(p w)] with w_d = 1 / 10000^(d / (dim / 2)), in float64 (numpy)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim, grid, cls_token):
    # The official meshgrid puts the width coordinate first: the first half of each row
    # encodes the column, the second half the row.
    columns, rows = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    emb = np.concatenate([sincos_1d(dim // 2, columns), sincos_1d(dim // 2, rows)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return emb


class ReferenceMae(nn.Module):
    """The official MaskedAutoencoderViT's structure and forward pass."""

    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, decoder_embed_dim, decoder_depth,
                 decoder_num_heads, mlp_ratio=4.0):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)])
        self.norm = norm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
             for _ in range(decoder_depth)])
        self.decoder_norm = norm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * 3, bias=True)
        self.p = patch_size
        grid = int(n ** 0.5)
        self.pos_embed.data.copy_(torch.from_numpy(sincos_2d(embed_dim, grid, True)).float().unsqueeze(0))
        self.decoder_pos_embed.data.copy_(
            torch.from_numpy(sincos_2d(decoder_embed_dim, grid, True)).float().unsqueeze(0))

    def patchify(self, imgs):
        p = self.p
        h = w = imgs.shape[2] // p
        x = imgs.reshape(imgs.shape[0], 3, h, p, w, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(imgs.shape[0], h * w, p * p * 3)

    def mask_from_ids(self, x, ids_shuffle, keep):
        n, length, dim = x.shape
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, dim))
        mask = torch.ones([n, length])
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return kept, mask, ids_restore

    def forward_encoder(self, imgs, ids_shuffle, keep):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.mask_from_ids(x, ids_shuffle, keep)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        masks = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], masks], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def loss(self, imgs, pred, mask, norm_pix):
        target = self.patchify(imgs)
        if norm_pix:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()


def randomised(model, seed):
    """Every parameter random (biases and norms too, so that a mix-up of any of them shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pos_embed" in name:
                continue
            fan_in = p.shape[-1] if p.dim() >= 2 else 1
            if name.endswith("proj.weight") and p.dim() == 4:
                fan_in = p[0].numel()
            scale = 1.0 / fan_in ** 0.5 if p.dim() >= 2 else 0.2
            p.copy_(torch.randn(p.shape, generator=g) * scale)
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm.weight"):
                p.add_(1.0)
    return model


def sliding_mask(grid, a, b):
    """Pass (a, b) of the 2x2 sliding family: patch (i, j) removed when (i % 2, j % 2) == (a, b)."""
    return torch.tensor([[float(i % 2 == a and j % 2 == b) for i in range(grid) for j in range(grid)]])


def main():
    torch.manual_seed(0)
    model = randomised(ReferenceMae(32, 8, 64, 2, 4, 32, 1, 4), seed=1).eval()
    g = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 32, 32, generator=g)
    noise = torch.rand(2, 16, generator=g)
    keep = int(16 * (1 - 0.75))
    with torch.no_grad():
        ids_shuffle = torch.argsort(noise, dim=1)
        latent, mask, ids_restore = model.forward_encoder(images, ids_shuffle, keep)
        pred = model.forward_decoder(latent, ids_restore)
        loss = model.loss(images, pred, mask, norm_pix=False)
        loss_norm = model.loss(images, pred, mask, norm_pix=True)
        given = sliding_mask(4, 1, 0).repeat(2, 1)
        # Visible patches in index order, then the removed ones (a stable sort of the mask).
        given_ids = torch.sort(given, dim=1, stable=True).indices
        latent_given, _, restore_given = model.forward_encoder(images, given_ids, int(16 - given[0].sum()))
        pred_given = model.forward_decoder(latent_given, restore_given)
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    extra = {
        "golden.images": images,
        "golden.noise": noise,
        "golden.mask": mask,
        "golden.latent": latent,
        "golden.pred": pred,
        "golden.loss": loss.reshape(1),
        "golden.loss_norm_pix": loss_norm.reshape(1),
        "golden.given_mask": given[0],
        "golden.pred_given": pred_given,
    }
    tensors.update({k: v.contiguous() for k, v in extra.items()})
    save_file(tensors, os.path.join(HERE, "golden.safetensors"))

    small = randomised(ReferenceMae(8, 4, 16, 1, 2, 8, 1, 2), seed=3).eval()
    small_images = torch.randn(1, 3, 8, 8, generator=g)
    with torch.no_grad():
        removed = sliding_mask(2, 0, 1)
        ids = torch.sort(removed, dim=1, stable=True).indices
        lat, _, restore = small.forward_encoder(small_images, ids, 3)
        small_pred = small.forward_decoder(lat, restore)
    torch.save({"model": small.state_dict(), "epoch": 0,
                "golden": {"images": small_images, "removed": removed[0], "pred": small_pred}},
               os.path.join(HERE, "official_format.pth"))
    print("loss", loss.item(), "loss_norm_pix", loss_norm.item())


if __name__ == "__main__":
    main()
