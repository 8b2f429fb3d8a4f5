"""sapo-ray: Segment-Aligned Policy Optimization and RL baselines for (vision-)language models on Ray."""

__version__ = "0.1.0"
