"""The virtual ZTF-like survey (lakepipe's offline default archive) and its emulator.

Modules: :mod:`~lakepipe.sim.survey` (configuration, fields, schedule, conditions),
:mod:`~lakepipe.sim.catalog` (stars, Gaia-like catalog), :mod:`~lakepipe.sim.variables`
(periodic variables, the transient), :mod:`~lakepipe.sim.asteroids` (orbits and tracks),
:mod:`~lakepipe.sim.scene` (truth and pixels of one exposure), :mod:`~lakepipe.sim.render`
(PSFs, noise, defects), :mod:`~lakepipe.sim.tan` (TAN WCS), :mod:`~lakepipe.sim.fitsio`
(headers, cutouts) and :mod:`~lakepipe.sim.emulator` (the loopback archive server). The
``sim`` archive kind (:mod:`lakepipe.archives.sim`) is the public entry point.
"""
