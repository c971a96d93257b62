//! Images, datasets, masks, tiling and stitching, ignore masks, map files. (Registration lives in
//! `vigil-register`.)

pub mod dataset;
pub mod io;
pub mod source;

pub use dataset::{list_classes, validation_split, Dataset, TestItem};
pub use io::{
    list_images, list_images_recursive, load_image, load_map_tiff, load_mask, write_map_png16, write_map_tiff,
};
pub use source::{BadFilePolicy, FileSource, SourceOptions};

#[cfg(test)]
pub(crate) mod testutil;
