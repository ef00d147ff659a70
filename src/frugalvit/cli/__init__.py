"""The `frugalvit` command line."""
