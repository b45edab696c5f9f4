"""mergestream: continual model merging in constant memory."""

__version__ = "0.1.0"
