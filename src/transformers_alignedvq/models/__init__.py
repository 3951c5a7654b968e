"""One folder per model family, laid out as Transformers lays out a model folder; each is exactly what a
checkpoint ships as remote code.

Transformers is imported here, before any model file starts: the package root registers the Auto classes right
after ``import transformers``, and that registration imports the model files. Were Transformers first imported
from inside a model file, that file would still be half-run, and registration would fail."""

try:
    import transformers  # noqa: F401
except ImportError:  # a model file then fails on its own import of it
    pass
