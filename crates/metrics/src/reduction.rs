//! Reductions of an anomaly map to one image score.

use serde::{Deserialize, Serialize};
use vigil_core::{Map, Result, VigilError};

/// How an anomaly map becomes an image score. Serialised in kebab-case with a `kind` tag,
/// e.g. `{"kind": "mean-filter-max", "size": 21}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ImageScoreReduction {
    /// Maximum of the map (the MVTec evaluation tool, U-Flow, PatchCore).
    Max,
    /// Maximum of the map after a `size`×`size` mean filter with zero padding counted
    /// (DRAEM: `avg_pool2d(21, stride 1, padding 10)` then max). `size` must be odd.
    MeanFilterMax { size: usize },
    /// Mean of the map.
    Mean,
}

impl ImageScoreReduction {
    /// DRAEM's window: `avg_pool2d(kernel 21)` before the max.
    pub const DRAEM_MEAN_FILTER_SIZE: usize = 21;

    /// The image score of `map`. Errors on an empty map, a non-finite value or an even/zero
    /// mean-filter size.
    pub fn reduce(&self, map: &Map) -> Result<f32> {
        if map.data.is_empty() {
            return Err(VigilError::invalid("image score: the anomaly map is empty"));
        }
        map.check_finite("image score")?;
        match *self {
            ImageScoreReduction::Max => Ok(map.max()),
            ImageScoreReduction::Mean => Ok(map.mean()),
            ImageScoreReduction::MeanFilterMax { size } => {
                if size % 2 == 0 {
                    return Err(VigilError::invalid(format!(
                        "image score: the mean-filter size must be odd, got {size}"
                    )));
                }
                Ok(map.mean_filter(size).max())
            }
        }
    }
}

/// Command-line form: `max`, `mean`, `mean-filter-max` (size 21, as DRAEM) or
/// `mean-filter-max:<odd size>`.
impl std::str::FromStr for ImageScoreReduction {
    type Err = VigilError;

    fn from_str(s: &str) -> Result<Self> {
        let invalid = || {
            VigilError::Config(format!(
                "image score reduction {s:?}: expected max, mean, mean-filter-max or mean-filter-max:<odd size>"
            ))
        };
        match s.split_once(':') {
            None => match s {
                "max" => Ok(ImageScoreReduction::Max),
                "mean" => Ok(ImageScoreReduction::Mean),
                "mean-filter-max" => {
                    Ok(ImageScoreReduction::MeanFilterMax { size: Self::DRAEM_MEAN_FILTER_SIZE })
                }
                _ => Err(invalid()),
            },
            Some(("mean-filter-max", size)) => match size.parse::<usize>() {
                Ok(size) if size % 2 == 1 => Ok(ImageScoreReduction::MeanFilterMax { size }),
                _ => Err(invalid()),
            },
            Some(_) => Err(invalid()),
        }
    }
}

impl std::fmt::Display for ImageScoreReduction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageScoreReduction::Max => write!(f, "max"),
            ImageScoreReduction::Mean => write!(f, "mean"),
            ImageScoreReduction::MeanFilterMax { size } => write!(f, "mean-filter-max:{size}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reductions_of_a_single_peak() {
        let mut map = Map::filled(5, 5, 0.0);
        map.data[12] = 9.0;
        assert_eq!(ImageScoreReduction::Max.reduce(&map).unwrap(), 9.0);
        assert!((ImageScoreReduction::Mean.reduce(&map).unwrap() - 9.0 / 25.0).abs() < 1e-6);
        let filtered = ImageScoreReduction::MeanFilterMax { size: 3 }.reduce(&map).unwrap();
        assert!((filtered - 1.0).abs() < 1e-6, "{filtered}");
    }

    #[test]
    fn bad_size_empty_and_nan_maps_are_errors() {
        let map = Map::filled(3, 3, 1.0);
        let e = ImageScoreReduction::MeanFilterMax { size: 4 }.reduce(&map).unwrap_err().to_string();
        assert!(e.contains("must be odd, got 4"), "{e}");
        assert!(ImageScoreReduction::MeanFilterMax { size: 0 }.reduce(&map).is_err());
        assert!(ImageScoreReduction::Max.reduce(&Map::filled(0, 0, 0.0)).is_err());
        let mut nan = map.clone();
        nan.data[4] = f32::NAN;
        assert!(ImageScoreReduction::Max.reduce(&nan).unwrap_err().to_string().contains("non-finite"));
    }

    #[test]
    fn parses_the_command_line_form_and_prints_it_back() {
        let draem: ImageScoreReduction = "mean-filter-max".parse().unwrap();
        assert_eq!(draem, ImageScoreReduction::MeanFilterMax { size: 21 });
        for r in [ImageScoreReduction::Max, ImageScoreReduction::Mean, draem] {
            assert_eq!(r.to_string().parse::<ImageScoreReduction>().unwrap(), r);
        }
        assert_eq!(
            "mean-filter-max:5".parse::<ImageScoreReduction>().unwrap().to_string(),
            "mean-filter-max:5"
        );
        for bad in ["median", "mean-filter-max:4", "mean-filter-max:x", "max:3", ""] {
            let e = bad.parse::<ImageScoreReduction>().unwrap_err().to_string();
            assert!(e.contains("expected max, mean"), "{bad}: {e}");
        }
    }

    #[test]
    fn serialises_in_kebab_case() {
        let r = ImageScoreReduction::MeanFilterMax { size: 21 };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, r#"{"kind":"mean-filter-max","size":21}"#);
        assert_eq!(serde_json::from_str::<ImageScoreReduction>(&json).unwrap(), r);
        assert_eq!(serde_json::to_string(&ImageScoreReduction::Max).unwrap(), r#"{"kind":"max"}"#);
    }
}
