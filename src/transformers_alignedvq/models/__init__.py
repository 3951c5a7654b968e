"""One folder per model family, laid out as Transformers lays out a model folder; each is exactly what a
checkpoint ships as remote code."""
