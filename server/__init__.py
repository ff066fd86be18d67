"""actprune.server: the vLLM plugin that captures activation statistics while serving.

Importing this package imports nothing from vLLM; the plugin entry points import lazily."""
