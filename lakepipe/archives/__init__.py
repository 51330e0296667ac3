"""Archive kinds: one module each, registered with ``register_archive``."""
