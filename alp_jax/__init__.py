"""alp-jax: Adversarial Logit Pairing in JAX/Flax."""

__version__ = "0.1.0"

from alp_jax import attacks as _attacks  # noqa: F401  (registers the extra attack specs)
