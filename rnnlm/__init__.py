"""rnnlm: recurrent language models trained in PyTorch and served from onnxruntime.

This package's top level imports nothing heavy: ``rnnlm.serve`` must load without torch.
"""

__version__ = "0.1.0"
