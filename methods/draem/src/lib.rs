//! DRAEM and DRAEM-UNet++: reconstructive + discriminative networks on synthetic anomalies.
