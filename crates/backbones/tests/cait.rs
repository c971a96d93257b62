//! CaiT trunks and MS-CaiT (no CaiT weights are shipped): the real configurations' tensor
//! shapes, tiny trunks' output shapes, and weight round trips with timm names. A small CaiT's
//! tokens are checked against timm in golden_formula.rs.

use burn::tensor::{Tensor, TensorData};
use vigil_backbones::{default_device, write_state, Cait, CaitConfig, MsCait};
use vigil_core::{Image, TensorBag};

fn tiny(image_size: usize, patch_size: usize, embed_dim: usize) -> CaitConfig {
    CaitConfig { image_size, patch_size, embed_dim, depth: 3, num_heads: 4, mlp_ratio: 4, last_block: 1 }
}

fn test_image(width: usize, height: usize, channels: usize, phase: f32) -> Image {
    let data =
        (0..width * height * channels).map(|i| (((i as f32) * 0.37 + phase).sin() + 1.0) / 2.0).collect();
    Image::new(width, height, channels, data).unwrap()
}

fn batch(config: &CaitConfig, n: usize) -> Tensor<4> {
    let s = config.image_size;
    let data: Vec<f32> = (0..n * 3 * s * s).map(|i| ((i as f32) * 0.21).sin()).collect();
    Tensor::from_data(TensorData::new(data, [n, 3, s, s]), &default_device())
}

fn values(tensor: Tensor<4>) -> Vec<f32> {
    tensor.into_data().try_into_vec_as::<f32>().unwrap()
}

fn shape_of(config: &CaitConfig, name: &str) -> Vec<usize> {
    let shapes = config.parameter_shapes();
    shapes.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{name} is not listed")).1.clone()
}

#[test]
fn real_configurations_have_timm_shapes() {
    let s24 = CaitConfig::s24_224();
    s24.validate().unwrap();
    assert_eq!((s24.embed_dim, s24.depth, s24.num_heads, s24.grid()), (384, 24, 8, 14));
    assert_eq!(shape_of(&s24, "patch_embed.proj.weight"), [384, 3, 16, 16]);
    assert_eq!(shape_of(&s24, "pos_embed"), [1, 196, 384]);
    assert_eq!(shape_of(&s24, "blocks.20.attn.qkv.weight"), [1152, 384]);
    assert_eq!(shape_of(&s24, "blocks.20.attn.proj_l.weight"), [8, 8]);
    assert_eq!(shape_of(&s24, "blocks.20.mlp.fc1.weight"), [1536, 384]);
    assert_eq!(shape_of(&s24, "norm.weight"), [384]);
    // U-Flow's truncation: blocks 0..=20 are read, block 21 is not.
    assert!(s24.parameter_shapes().iter().all(|(n, _)| !n.starts_with("blocks.21.")));

    let m48 = CaitConfig::m48_448();
    m48.validate().unwrap();
    assert_eq!((m48.embed_dim, m48.depth, m48.num_heads, m48.grid()), (768, 48, 16, 28));
    assert_eq!(shape_of(&m48, "pos_embed"), [1, 784, 768]);
    assert_eq!(shape_of(&m48, "blocks.40.attn.qkv.bias"), [2304]);
    assert_eq!(shape_of(&m48, "blocks.40.attn.proj_w.weight"), [16, 16]);
    assert_eq!(shape_of(&m48, "blocks.40.mlp.fc2.weight"), [768, 3072]);
    assert_eq!(shape_of(&m48, "blocks.40.gamma_2"), [768]);
    assert!(m48.parameter_shapes().iter().all(|(n, _)| !n.starts_with("blocks.41.")));

    // Whole self-attention trunks. Adding what the trunk leaves out (cls_token, the two
    // class-attention blocks of 12d^2 + 15d weights, the 1000-way head) gives timm's published
    // totals: 46.92 M for cait_s24_224 and 356.46 M for cait_m48_448.
    let full = |c: &CaitConfig| CaitConfig { last_block: c.depth - 1, ..c.clone() };
    let left_out = |d: usize| d + 2 * (12 * d * d + 15 * d) + 1000 * d + 1000;
    let s24_total = full(&s24).parameter_count() + left_out(384);
    let m48_total = full(&m48).parameter_count() + left_out(768);
    assert_eq!(s24_total, 46_916_200);
    assert_eq!(m48_total, 356_460_520);
    // U-Flow's truncated trunks: 21 and 41 blocks of 12d^2 + 15d + 2h^2 + 2h weights, patch and
    // position embeddings, final norm.
    assert_eq!(s24.parameter_count(), 21 * 1_775_376 + 295_296 + 75_264 + 768);
    assert_eq!(m48.parameter_count(), 41 * 7_089_952 + 590_592 + 602_112 + 1_536);
}

#[test]
fn invalid_configurations_are_rejected() {
    let bad = [
        CaitConfig { last_block: 24, ..CaitConfig::s24_224() },
        CaitConfig { num_heads: 7, ..CaitConfig::s24_224() },
        CaitConfig { image_size: 230, ..CaitConfig::s24_224() },
        CaitConfig { patch_size: 0, ..CaitConfig::s24_224() },
    ];
    for config in bad {
        assert!(config.validate().is_err(), "{config:?}");
        assert!(Cait::random(&config, 0).is_err());
    }
}

#[test]
fn trunk_gives_a_channel_major_token_map() {
    let config = tiny(32, 8, 32);
    let cait = Cait::random(&config, 4).unwrap();
    let tokens = cait.tokens(batch(&config, 2)).unwrap();
    assert_eq!(tokens.dims(), [2, 16, 32]);
    let map = cait.feature_map(batch(&config, 2)).unwrap();
    assert_eq!(map.dims(), [2, 32, 4, 4]);
    // map[n, c, y, x] is token y * 4 + x of image n.
    let (tokens, map) = (tokens.into_data().try_into_vec_as::<f32>().unwrap(), values(map));
    for (n, c, y, x) in [(0, 0, 0, 1), (1, 31, 3, 2), (1, 7, 2, 0)] {
        assert_eq!(map[((n * 32 + c) * 4 + y) * 4 + x], tokens[(n * 16 + y * 4 + x) * 32 + c]);
    }
    assert!(map.iter().all(|v| v.is_finite()));
    let err = cait.tokens(batch(&tiny(24, 8, 32), 1)).unwrap_err().to_string();
    assert!(err.contains("[N>0, 3, 32, 32]") && err.contains("24"), "{err}");
}

#[test]
fn timm_named_weights_round_trip_through_safetensors() {
    let config = tiny(32, 8, 32);
    let state = Cait::random_state(&config, 11).unwrap();
    assert!(state.names().any(|n| n == "blocks.1.attn.proj_l.weight"));
    // A timm file also holds what the truncated trunk does not use.
    let mut file_state = TensorBag::new();
    for name in state.names() {
        let shape = state.shape(name).unwrap().to_vec();
        file_state.put_f32(name, &shape, state.f32(name, None).unwrap());
    }
    file_state.put_f32("cls_token", &[1, 1, 32], vec![0.5; 32]);
    file_state.put_f32("blocks_token_only.0.attn.q.weight", &[32, 32], vec![0.0; 32 * 32]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cait_tiny.safetensors");
    write_state(&file_state, &path).unwrap();

    let original = Cait::random(&config, 11).unwrap();
    let loaded = Cait::load(&config, &path).unwrap();
    let want = values(original.feature_map(batch(&config, 1)).unwrap());
    assert_eq!(values(loaded.feature_map(batch(&config, 1)).unwrap()), want);
    let other = Cait::random(&config, 12).unwrap();
    assert_ne!(values(other.feature_map(batch(&config, 1)).unwrap()), want);

    // A deeper truncation needs block 2, which this file lacks.
    let deeper = CaitConfig { last_block: 2, ..config.clone() };
    let err = Cait::load(&deeper, &path).err().unwrap().to_string();
    assert!(err.contains("cait_tiny.safetensors") && err.contains("blocks.2.norm1.weight"), "{err}");
    // A file for another width: the first tensor read has the wrong shape.
    let err = Cait::load(&tiny(32, 8, 48), &path).err().unwrap().to_string();
    assert!(err.contains("patch_embed.proj.weight") && err.contains("[32, 3, 8, 8]"), "{err}");
    let err = Cait::load(&config, &dir.path().join("absent.safetensors")).err().unwrap().to_string();
    assert!(err.contains("absent.safetensors"), "{err}");
}

#[test]
fn ms_cait_extracts_two_scales_one_octave_apart() {
    let device = default_device();
    let fine = Cait::random_on(&tiny(32, 8, 32), 1, &device).unwrap();
    // The coarse trunk sees the image bicubically resized from 32 to 16 pixels.
    let coarse = Cait::random_on(&tiny(16, 8, 24), 2, &device).unwrap();
    let ms = MsCait::new(fine.clone(), coarse.clone()).unwrap();
    assert_eq!(ms.input_size(), 32);
    assert_eq!(ms.scales(), [(32, 4), (24, 2)]);
    assert_eq!(ms.strides(), [8, 16]);

    // Gray, RGB and RGBA images of other sizes, three of them to cross a batch boundary.
    let images = [test_image(40, 30, 3, 0.0), test_image(20, 20, 1, 1.0), test_image(32, 32, 4, 2.0)];
    let features = ms.extract(&images).unwrap();
    assert_eq!(features.len(), 3);
    for maps in &features {
        let shapes: Vec<_> = maps.iter().map(|m| (m.channels, m.height, m.width)).collect();
        assert_eq!(shapes, [(32, 4, 4), (24, 2, 2)]);
        assert!(maps.iter().all(|m| m.data.iter().all(|v| v.is_finite())));
    }
    assert_ne!(features[0][0], features[1][0]);
    assert_ne!(features[0][1], features[2][1]);
    // Batching does not change an image's features.
    let alone = ms.extract(&images[2..]).unwrap();
    let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5);
    assert!(close(&alone[0][0].data, &features[2][0].data) && close(&alone[0][1].data, &features[2][1].data));

    // The fine scale is the fine trunk on the preprocessed image.
    let direct = values(fine.feature_map(ms.preprocess(&images[..1]).unwrap()).unwrap());
    assert!(close(&direct, &features[0][0].data));

    let mismatched = MsCait::new(fine, Cait::random_on(&tiny(32, 8, 24), 2, &device).unwrap());
    assert!(mismatched.err().unwrap().to_string().contains("half"));
    assert!(ms.extract(&[]).unwrap().is_empty());
    assert!(ms.preprocess(&[]).is_err());
}

#[test]
fn trunks_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Cait>();
    assert_send_sync::<MsCait>();
}
