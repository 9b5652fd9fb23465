"""qbd: does a backdoor defense still work on the model as it is deployed, i.e. quantized?"""

__version__ = "0.1.0"
