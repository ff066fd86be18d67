"""actprune.client: the light half (no torch, no vLLM): wire formats, HTTP client, CLI."""
