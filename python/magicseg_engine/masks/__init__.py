"""Stage 5 of the pipeline: attention-derived boxes and points -> per-class masks refined by SAM."""
