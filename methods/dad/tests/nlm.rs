//! vigil's NLM against scikit-image's `denoise_nl_means(fast_mode=True)` on the cases of
//! `fixtures/nlm_skimage.json` (written by `fixtures/make_nlm_fixture.py`).

use vigil_dad::{nl_means, NlmParams};

#[test]
fn nl_means_matches_scikit_image() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/nlm_skimage.json");
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for case in cases {
        let n = |k: &str| case[k].as_u64().unwrap() as usize;
        let f = |k: &str| case[k].as_f64().unwrap();
        let values =
            |k: &str| case[k].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect::<Vec<_>>();
        let input: Vec<f32> = values("input").iter().map(|&v| v as f32).collect();
        let expected = values("output");
        let params = NlmParams {
            patch_size: n("patch_size"),
            patch_distance: n("patch_distance"),
            h: f("h"),
            sigma: f("sigma"),
        };
        let out = nl_means(&input, n("channels"), n("height"), n("width"), &params).unwrap();
        let worst = out.iter().zip(&expected).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
        // f32 output of an f64 computation.
        assert!(worst < 1e-6, "{}: max difference {worst}", case["name"]);
        // The denoising did something: the output is not the input.
        let moved = out.iter().zip(&input).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(moved > 1e-2, "{}", case["name"]);
    }
}
