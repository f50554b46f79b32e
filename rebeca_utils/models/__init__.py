"""Stage 2, models: the REBECA prior, the dSprites VAE, the verifier network, the encoders of the two CLIP spaces, the decoder, the weights registry."""
