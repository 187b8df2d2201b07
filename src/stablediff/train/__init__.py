"""Training: data (procedural shapes world, captioned folders, latent caches), losses, trainer loop."""
