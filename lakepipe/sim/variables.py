"""Time-variable sky content: periodic variables and the fading transient.

Magnitudes are offsets from the mean (catalog) magnitude; positive = fainter.

- ``sinusoid``: ``Δm = (A/2) sin(2π φ)``.
- ``rrlyrae``: an RRab-like sawtooth, rise over 15 % of the period and linear decline
  over 85 % (the asymmetric shape of fundamental-mode RR Lyrae; e.g. Smith 1995,
  *RR Lyrae Stars*, CUP), peak-to-peak ``A``; its time average is zero.
- transient: ``F(t) = F_peak (1 + (t - t0)/τ)^(-α)`` for ``t ≥ t0``, zero before: a
  power-law decline (afterglow-like) with ``τ = 1 d``; in magnitudes
  ``m = m_peak + 2.5 α log10(1 + (t - t0)/τ)``.

Phase ``φ = ((t - epoch_mjd) / period_d) mod 1``; times MJD UTC (light-travel across the
survey is ignored; the truth uses the same clock).
"""

from __future__ import annotations

import numpy as np

RISE_FRACTION = 0.15
TRANSIENT_TAU_D = 1.0


def variable_dmag(
    kind: np.ndarray | str,
    period_d: np.ndarray,
    amplitude_mag: np.ndarray,
    epoch_mjd: np.ndarray,
    mjd: float | np.ndarray,
) -> np.ndarray:
    """Magnitude offset from the mean for periodic variables at ``mjd`` (UTC)."""
    phase = np.mod((np.asarray(mjd) - np.asarray(epoch_mjd)) / np.asarray(period_d), 1.0)
    sin = 0.5 * np.sin(2.0 * np.pi * phase)
    saw = np.where(
        phase < RISE_FRACTION,
        0.5 - phase / RISE_FRACTION,
        -0.5 + (phase - RISE_FRACTION) / (1.0 - RISE_FRACTION),
    )
    shape = np.where(np.asarray(kind) == "rrlyrae", saw, sin)
    return np.asarray(amplitude_mag) * shape


def transient_mag(
    mjd: float | np.ndarray, t0_mjd: float, peak_mag: float, alpha: float
) -> np.ndarray:
    """Transient magnitude at ``mjd`` (inf before ``t0_mjd``): power-law decline."""
    dt = np.asarray(mjd, dtype=np.float64) - t0_mjd
    with np.errstate(invalid="ignore", divide="ignore"):
        m = peak_mag + 2.5 * alpha * np.log10(1.0 + np.maximum(dt, 0.0) / TRANSIENT_TAU_D)
    return np.where(dt >= 0.0, m, np.inf)
