"""The embedded local stack: moto server, resource bootstrap, demo seed and provider sandboxes."""
