//! U-Flow: U-shaped normalizing flow on multi-scale features with a contrario segmentation.
