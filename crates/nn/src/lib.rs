//! vigil's deep-learning engine on burn.
