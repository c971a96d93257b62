//! `--ignore-mode before` and `after` for FastFlow on the built binary (issue 10 item 2): in
//! `before` mode the ignored positions leave the training loss and the image score.

mod ignore_support;

/// The CPU preset (MobileNetV2 features.3 / .6 / .13 with the shipped weights, 128 px) with 20
/// epochs instead of 40 to keep the test short.
const FASTFLOW: &str = "fastflow:epochs=20";

#[test]
fn ignored_defect_does_not_flag_the_image_in_either_mode() {
    ignore_support::check_both_modes(FASTFLOW);
}
