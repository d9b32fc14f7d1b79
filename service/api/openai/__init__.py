"""The OpenAI-compatible API: /v1/completions (characters as tokens) in OpenAI's wire format."""
