"""DUO's KV-cache layout in vLLM's block pool.

Retrieval heads keep vLLM's own full-attention pages (one ``FullAttentionSpec`` per layer with
that layer's retrieval head count); streaming heads live in a second KV-cache group whose
manager frees every block between the attention sinks and the recent window, so each request
holds a constant number of streaming blocks whatever its length. See docs/kv_cache.md.
"""
