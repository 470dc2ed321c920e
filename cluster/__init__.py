"""Long-lived Ray actors and services: the mining index, search shards, the HTTP app, storage."""
