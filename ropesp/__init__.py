"""ropesp: Causal-RoPE sequence-parallel export and runtime for streaming causal video DiTs."""

__version__ = "0.1.0"
