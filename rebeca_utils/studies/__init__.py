"""Stage 6, studies: the controlled dSprites study (later the ablations and the new-user study)."""
