//! PaDiM: per-position Gaussian of multi-layer features, Mahalanobis map.
