"""OpenAI-compatible routes: the legacy Completions API and the models list, with sessions as an extension."""
