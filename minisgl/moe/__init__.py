"""The Mixture-of-Experts block: router (gate), AllToAll dispatch and combine, grouped experts."""
