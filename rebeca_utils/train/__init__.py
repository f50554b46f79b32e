"""Stage 3, training: diffusion objectives and the prior's loop, the verifier, early stopping, the App E.1 grid."""
