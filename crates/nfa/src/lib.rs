//! A contrario statistics in log space: chi-square and binomial tails, NFA, max-tree segmentation.
//!
//! NFA values underflow f64 long before they stop mattering, so everything here is a log10.

pub mod block;
pub mod calibration;
pub mod maxtree;
pub mod noise;
pub mod polyomino;
pub mod region;
pub mod tails;
