//! Heatmaps, overlays, HTML reports and markdown tables.
