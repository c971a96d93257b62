//! `--ignore-mode before` and `after` for PatchCore on the built binary (issue 10 item 2).

mod ignore_support;

/// Random ResNet-18 weights (no download needed); the stride-4 and stride-8 layers keep the
/// features local enough for a 128-px image.
const PATCHCORE: &str =
    "patchcore:backbone=resnet18,random_weights_seed=3,input_size=128,layers=[\"layer1\",\"layer2\"]";

#[test]
fn ignored_defect_does_not_flag_the_image_in_either_mode() {
    ignore_support::check_both_modes(PATCHCORE);
}
