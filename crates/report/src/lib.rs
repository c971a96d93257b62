//! Heatmaps, overlays, HTML reports and markdown tables.
//!
//! Nothing here computes metrics: the CLI fills the plain data types of [`html`] and
//! [`markdown`] from vigil-metrics, so this crate only renders.

mod base64;
pub mod colormap;
pub mod html;
pub mod markdown;
pub mod overlay;
pub mod pictures;
mod svg;

pub use colormap::{colorize, normalize, robust_range, turbo};
pub use html::{
    format_score, render_html, write_html, Comparison, Curve, KindPixels, KindRow, ReportData, ReportItem,
    ReportThreshold, THUMBNAIL_MAX_SIDE,
};
pub use image::RgbImage;
pub use markdown::{csv_string, markdown_table, write_csv};
pub use overlay::{
    draw_edge, encode_gray_png, encode_png, outer_outline, outline, overlay, thumbnail, to_rgb, write_png,
    INVALID_COLOUR, OUTLINE_COLOUR, TRUTH_COLOUR,
};
pub use pictures::{ItemPictures, Picture, View, Views, LARGE_VIEW_MAX_SIDE};
