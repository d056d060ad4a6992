"""lctx: patch a HuggingFace decoder's RoPE in place and measure how it behaves past its training length."""

__version__ = "0.1.0"
