"""The OpenAI-compatible HTTP server: protocol, rank 0's front end, the serving loop, the command line."""
