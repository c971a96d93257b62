//! Images, datasets, masks, tiling and stitching, ignore masks, map files. (Registration lives in
//! `vigil-register`.)

pub mod dataset;
pub mod ignore;
pub mod io;
pub mod source;
pub mod tiling;

pub use dataset::{list_classes, validation_split, Dataset, TestItem};
pub use ignore::{apply_after, load_ignore_mask, IgnoreMode};
pub use io::{list_images, load_image, load_map_tiff, load_mask, write_map_png16, write_map_tiff};
pub use source::{BadFilePolicy, FileSource, SourceOptions};
pub use tiling::{
    default_overlap, score_detector_tiled, score_tiled, seam_measure, ImageTiles, SeamMeasure, Stitcher,
    Tile, TileGrid, TiledSource,
};

#[cfg(test)]
pub(crate) mod testutil;
