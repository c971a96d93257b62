use std::collections::BTreeMap;

use safetensors::tensor::{Dtype, TensorView};

use crate::{Result, VigilError};

/// Named arrays a method saves as its learned state. Stored as safetensors, so the same
/// container carries network weights (PyTorch names) and plain statistics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TensorBag {
    tensors: BTreeMap<String, StoredTensor>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct StoredTensor {
    pub shape: Vec<usize>,
    pub data: TensorData,
}

#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    /// Half precision halves memory-bank files (PatchCore); widened to f32 on read.
    F16(Vec<half::f16>),
    F64(Vec<f64>),
    I64(Vec<i64>),
}

impl TensorBag {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    fn insert(&mut self, name: &str, shape: &[usize], data: TensorData, len: usize) {
        assert_eq!(shape.iter().product::<usize>(), len, "tensor {name}: shape does not match data");
        self.tensors.insert(name.to_string(), StoredTensor { shape: shape.to_vec(), data });
    }

    pub fn put_f32(&mut self, name: &str, shape: &[usize], data: Vec<f32>) {
        let n = data.len();
        self.insert(name, shape, TensorData::F32(data), n);
    }

    pub fn put_f16(&mut self, name: &str, shape: &[usize], data: Vec<half::f16>) {
        let n = data.len();
        self.insert(name, shape, TensorData::F16(data), n);
    }

    pub fn put_f64(&mut self, name: &str, shape: &[usize], data: Vec<f64>) {
        let n = data.len();
        self.insert(name, shape, TensorData::F64(data), n);
    }

    pub fn put_i64(&mut self, name: &str, shape: &[usize], data: Vec<i64>) {
        let n = data.len();
        self.insert(name, shape, TensorData::I64(data), n);
    }

    pub fn get(&self, name: &str) -> Result<&StoredTensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| VigilError::Model(format!("tensor '{name}' is missing from the model state")))
    }

    /// The tensor as f32 (f16/f64 widened or narrowed), checked against an expected shape when given.
    pub fn f32(&self, name: &str, expected_shape: Option<&[usize]>) -> Result<Vec<f32>> {
        let t = self.get(name)?;
        if let Some(shape) = expected_shape {
            if t.shape != shape {
                return Err(VigilError::Model(format!(
                    "tensor '{name}' has shape {:?}, expected {:?}",
                    t.shape, shape
                )));
            }
        }
        Ok(match &t.data {
            TensorData::F32(v) => v.clone(),
            TensorData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            TensorData::F64(v) => v.iter().map(|&x| x as f32).collect(),
            TensorData::I64(v) => v.iter().map(|&x| x as f32).collect(),
        })
    }

    pub fn f64(&self, name: &str) -> Result<Vec<f64>> {
        let t = self.get(name)?;
        Ok(match &t.data {
            TensorData::F64(v) => v.clone(),
            TensorData::F32(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
            TensorData::I64(v) => v.iter().map(|&x| x as f64).collect(),
        })
    }

    pub fn i64(&self, name: &str) -> Result<Vec<i64>> {
        match &self.get(name)?.data {
            TensorData::I64(v) => Ok(v.clone()),
            _ => Err(VigilError::Model(format!("tensor '{name}' is not an integer tensor"))),
        }
    }

    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        Ok(&self.get(name)?.shape)
    }

    /// An error naming the first tensor holding NaN or infinity: learned state that can only
    /// give meaningless scores (a diverged training, degenerate statistics).
    pub fn check_finite(&self) -> Result<()> {
        for (name, t) in &self.tensors {
            let bad = match &t.data {
                TensorData::F32(v) => v.iter().position(|x| !x.is_finite()),
                TensorData::F16(v) => v.iter().position(|x| !x.is_finite()),
                TensorData::F64(v) => v.iter().position(|x| !x.is_finite()),
                TensorData::I64(_) => None,
            };
            if let Some(i) = bad {
                return Err(VigilError::Model(format!(
                    "tensor '{name}' holds a non-finite value (NaN or infinity) at element {i} of {}",
                    t.shape.iter().product::<usize>()
                )));
            }
        }
        Ok(())
    }

    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let bytes: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = self
            .tensors
            .iter()
            .map(|(name, t)| {
                let (dtype, raw) = match &t.data {
                    TensorData::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                    TensorData::F16(v) => (Dtype::F16, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                    TensorData::F64(v) => (Dtype::F64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                    TensorData::I64(v) => (Dtype::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                };
                (name.clone(), dtype, t.shape.clone(), raw)
            })
            .collect();
        let views: Vec<(String, TensorView)> = bytes
            .iter()
            .map(|(n, d, s, raw)| Ok((n.clone(), TensorView::new(*d, s.clone(), raw).map_err(st_err)?)))
            .collect::<Result<_>>()?;
        safetensors::serialize(views, &None).map_err(st_err)
    }

    pub fn from_safetensors(bytes: &[u8]) -> Result<Self> {
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(st_err)?;
        let mut bag = TensorBag::new();
        for (name, view) in st.tensors() {
            let raw = view.data();
            let shape = view.shape().to_vec();
            let data = match view.dtype() {
                Dtype::F32 => TensorData::F32(
                    raw.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
                ),
                Dtype::F16 => TensorData::F16(
                    raw.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]])).collect(),
                ),
                Dtype::F64 => TensorData::F64(
                    raw.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect(),
                ),
                Dtype::I64 => TensorData::I64(
                    raw.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect(),
                ),
                other => {
                    return Err(VigilError::Model(format!("tensor '{name}' has unsupported dtype {other:?}")))
                }
            };
            bag.tensors.insert(name, StoredTensor { shape, data });
        }
        Ok(bag)
    }
}

fn st_err(e: safetensors::SafeTensorError) -> VigilError {
    VigilError::Model(format!("safetensors: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_all_dtypes() {
        let mut bag = TensorBag::new();
        bag.put_f32("a", &[2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        bag.put_f16("b", &[1], vec![half::f16::from_f32(0.5)]);
        bag.put_f64("c", &[1], vec![1e-300]);
        bag.put_i64("d", &[2], vec![-1, 7]);
        let back = TensorBag::from_safetensors(&bag.to_safetensors().unwrap()).unwrap();
        assert_eq!(back, bag);
        assert!(back.f32("a", Some(&[4])).is_err());
        assert!(back.get("missing").unwrap_err().to_string().contains("missing"));
    }

    #[test]
    fn non_finite_values_are_named() {
        let mut bag = TensorBag::new();
        bag.put_f32("fine", &[2], vec![1.0, -2.0]);
        bag.put_i64("count", &[1], vec![i64::MAX]);
        bag.check_finite().unwrap();
        bag.put_f64("var", &[3], vec![1.0, 2.0, f64::INFINITY]);
        let err = bag.check_finite().unwrap_err().to_string();
        assert!(err.contains("'var'") && err.contains("element 2"), "{err}");
        let mut half_bag = TensorBag::new();
        half_bag.put_f16("bank", &[1], vec![half::f16::NAN]);
        assert!(half_bag.check_finite().is_err());
    }
}
