"""Output projection + softmax cross-entropy: public API (api.py), reference, chunked kernel."""
