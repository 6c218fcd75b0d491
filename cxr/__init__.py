"""cxr: train, evaluate, explain and serve chest X-ray classifiers."""
__version__ = "0.1.0"
