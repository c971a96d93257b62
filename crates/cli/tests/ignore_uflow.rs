//! `--ignore-mode before` and `after` for U-Flow on the built binary (issue 10 item 2): the
//! decision is the method's own NFA threshold (log10 NFA ≤ 0).

mod ignore_support;

/// The CPU preset: MobileNetV2 features.6 + features.13 with the shipped weights, 128 px, 60 epochs
/// (with 20 epochs the flow is still too rough for the spot to reach NFA ≤ 1 without a mask).
const UFLOW: &str = "uflow";

#[test]
fn ignored_defect_does_not_flag_the_image_in_either_mode() {
    ignore_support::check_both_modes(UFLOW);
}
