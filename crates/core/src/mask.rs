use crate::{Result, VigilError};

/// A binary pixel mask (ground truth, ignore region or predicted region). `true` = set.
#[derive(Clone, Debug, PartialEq)]
pub struct Mask {
    pub width: usize,
    pub height: usize,
    pub data: Vec<bool>,
}

impl Mask {
    pub fn new(width: usize, height: usize, data: Vec<bool>) -> Result<Self> {
        if data.len() != width * height {
            return Err(VigilError::invalid(format!(
                "mask data holds {} values, expected {width}x{height}",
                data.len()
            )));
        }
        Ok(Mask { width, height, data })
    }

    /// Err unless this ignore mask has the size of the image it goes with; `method` starts the
    /// message, so the user sees which detector refused it.
    pub fn check_fits(&self, image: &crate::Image, method: &str) -> Result<()> {
        if (self.width, self.height) != (image.width, image.height) {
            return Err(VigilError::invalid(format!(
                "{method}: ignore mask is {}x{} but the image is {}x{}",
                self.width, self.height, image.width, image.height
            )));
        }
        Ok(())
    }

    pub fn empty(width: usize, height: usize) -> Self {
        Mask { width, height, data: vec![false; width * height] }
    }

    pub fn count(&self) -> usize {
        self.data.iter().filter(|&&b| b).count()
    }

    #[inline]
    pub fn get(&self, y: usize, x: usize) -> bool {
        self.data[y * self.width + x]
    }

    /// Nearest-neighbour resampling (half-pixel centres), so a mask stays binary.
    pub fn resize_nearest(&self, width: usize, height: usize) -> Mask {
        let data = crate::map::resample_nearest(&self.data, (self.width, self.height), (width, height));
        Mask { width, height, data }
    }

    /// Which cells of a `width`×`height` grid laid over the image (a feature map) an ignore mask
    /// leaves in: a cell is out when the pixel at its centre is set (nearest sampling with
    /// half-pixel centres, so cell (i, j) reads pixel (⌊(i + ½)·W/width⌋, ⌊(j + ½)·H/height⌋)).
    pub fn kept_cells(&self, width: usize, height: usize) -> Vec<bool> {
        self.resize_nearest(width, height).data.iter().map(|&set| !set).collect()
    }

    pub fn crop(&self, x0: usize, y0: usize, width: usize, height: usize) -> Mask {
        let mut data = Vec::with_capacity(width * height);
        for y in y0..y0 + height {
            data.extend_from_slice(&self.data[y * self.width + x0..y * self.width + x0 + width]);
        }
        Mask { width, height, data }
    }
}
