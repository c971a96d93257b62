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

    pub fn crop(&self, x0: usize, y0: usize, width: usize, height: usize) -> Mask {
        let mut data = Vec::with_capacity(width * height);
        for y in y0..y0 + height {
            data.extend_from_slice(&self.data[y * self.width + x0..y * self.width + x0 + width]);
        }
        Mask { width, height, data }
    }
}
