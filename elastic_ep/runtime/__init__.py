"""The rank runtime: the agent embedded in a serving process, the plan executor, the
layer barrier, and the vLLM-style engine adapter."""
