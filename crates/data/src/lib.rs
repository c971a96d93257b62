//! Images, datasets, masks, tiling and stitching, ignore masks, map files.
