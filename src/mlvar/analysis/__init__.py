"""Pure-numpy analysis core: per-sample variance metrics, detection scores and accuracy spread."""
