"""SemanticMIM: masked image modeling with a proxy-token bottleneck (reference pipeline)."""

__version__ = "0.1.0"
