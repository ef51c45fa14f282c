"""Model services: pure model code, Ray Serve deployments and their Hypha gateway."""
