"""Platform-specific DUO backends; ``duo_vllm.backend`` picks the one for this platform."""
