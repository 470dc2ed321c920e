"""The retrieval model library: PyTorch and NumPy only, no Ray.

Backbones, pooling, the GeM and CGD heads, losses, whitening, multi-scale extraction, query
expansion and evaluation. Functional maths lives apart from the ``nn.Module`` wrappers so each
formula can be tested and reused on its own.
"""
