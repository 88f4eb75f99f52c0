"""ffpipe: Forward-Forward training as a pipelined multi-process service."""

__version__ = "0.1.0"
