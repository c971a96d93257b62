//! `--ignore-mode before` and `after` for the a contrario detector on the built binary (issue 10
//! item 2): Patch-PCA with training statistics, Patch-PCA with test-image statistics, and CNN features
//! with RegionNFA (random MobileNetV2 weights, no download needed). The decision is the method's own
//! NFA threshold (log10 NFA <= 0). The Patch-PCA runs count channels and scales among the tests:
//! with the thesis' count (per channel and scale) the blocky generated textures already give a few
//! false detections per normal image, which would flag the image whatever the mask does; CNN +
//! RegionNFA grows regions as the thesis text says, since the reference flood fill percolates over
//! half the pixels.

mod ignore_support;

#[test]
fn patch_pca_training_statistics() {
    ignore_support::check_both_modes(
        "acontrario:statistics=training,scales=2,patch_size=7,components=8,count_channels_and_scales=true",
    );
}

#[test]
fn patch_pca_test_image_statistics() {
    ignore_support::check_both_modes(
        "acontrario:statistics=test-image,scales=2,patch_size=7,components=8,count_channels_and_scales=true",
    );
}

#[test]
fn cnn_region_nfa() {
    ignore_support::check_both_modes(
        "acontrario:feature=cnn,nfa=region,growing=thesis,statistics=training,random_weights_seed=1,cnn_input=128",
    );
}
