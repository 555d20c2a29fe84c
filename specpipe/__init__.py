"""specpipe: distributed speculative decoding with exact outputs."""

__version__ = "0.1.0"
