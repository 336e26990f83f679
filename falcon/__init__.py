"""Falcon: semi-autoregressive drafter, CSGD objective, decoding tree and lossless speculative generation.

Pure torch + transformers; no Ray, no MLflow.
"""
