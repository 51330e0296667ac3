"""Stage kinds: one module each, registered with :func:`lakepipe.stages.base.register_stage`."""
