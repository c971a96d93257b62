//! Pretrained feature extractors on burn, loaded from safetensors with PyTorch names.
