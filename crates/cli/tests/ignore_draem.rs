//! `--ignore-mode before` and `after` for DRAEM on the built binary (issue 10 item 2).

mod ignore_support;

/// A tiny CPU configuration (64 px network input, widths 4, 200 steps of batch 4): the whole
/// test took 4 minutes on the shared 2-core machine under load average 10-20. 100 steps were
/// too few for the spot outside the ignored half to flag the image in before mode. The
/// procedural anomaly source needs no data.
const DRAEM: &str = "draem:image_size=64,recon_width=4,recon_depth=2,disc_width=4,disc_depth=3,\
                     steps=200,batch=4,lr=0.002,score_filter=3";

/// The UNet++ variant at the same size: only the reconstructive network differs.
const DRAEM_UNETPP: &str =
    "draem-unetpp:image_size=64,nested_width=4,nested_depth=2,disc_width=4,disc_depth=3,\
                            steps=200,batch=4,lr=0.002,score_filter=3";

#[test]
fn ignored_defect_does_not_flag_the_image_in_either_mode() {
    ignore_support::check_both_modes(DRAEM);
}

#[test]
fn ignored_defect_does_not_flag_the_image_in_either_mode_unetpp() {
    ignore_support::check_both_modes(DRAEM_UNETPP);
}
