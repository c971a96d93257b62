//! Exact metrics (AUROC, AP, AUPRO, F1, IoU) and thresholds.
