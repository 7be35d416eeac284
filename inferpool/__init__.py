"""inferpool: what the API and the workers must agree on.

Settings, queue and key names, the tensor and envelope codecs, the model
repository format, the cache, and a Python client. Nothing here imports torch.
"""

__version__ = "0.1.0"
