"""alp-jax: Adversarial Logit Pairing in JAX/Flax."""

__version__ = "0.1.0"
