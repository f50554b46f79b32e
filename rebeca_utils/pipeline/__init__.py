"""Stage 4, the generation pipeline: embedding store, prior sampling into work items, decoding."""
