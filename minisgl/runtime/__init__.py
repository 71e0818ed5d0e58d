"""The serving runtime: requests, the page pool, the prefix cache, the scheduler and the engine."""
