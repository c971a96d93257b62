//! Synthetic anomalies for training: Perlin masks, texture sources, DRAEM augmentations, cutout.
