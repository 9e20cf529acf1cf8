"""Evaluation through vLLM: synthetic long-context tasks (needle, multi-key, multi-value,
multi-query, variable tracking, common words, a short-context control) scored per attention
backend (stock, DUO, all-streaming, inverse and random patterns), offline or against a running
server. ``python -m duo_vllm.eval --help``; docs/eval.md."""
