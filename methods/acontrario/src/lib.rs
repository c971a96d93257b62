//! A contrario multi-scale detector (Patch-PCA / Gabor features, Mahalanobis, NFA).
