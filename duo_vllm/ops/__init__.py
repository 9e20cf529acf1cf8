"""Attention math for streaming heads, free of vLLM imports (callable from tests and kernels alike)."""
