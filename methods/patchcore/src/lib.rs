//! PatchCore: memory bank of locally aware patch features with a greedy coreset.
