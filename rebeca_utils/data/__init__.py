"""Stage 1, data: FLICKR-AES reader and validation, splits, the synthetic world, dSprites."""
