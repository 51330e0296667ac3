"""Point-spread-function fits: circular Moffat profiles fitted to star stamps.

The seeing of an image is the median FWHM of a dozen bright stars. Fitting them one at a
time with a general least-squares solver costs more than the fits themselves (about
5 ms a star in Python overhead); here all stars are fitted at once by a bounded
Levenberg–Marquardt iteration over stacked stamps, so a dozen fits cost about as much as
one.
"""

from __future__ import annotations

import math

import numpy as np

# 3×3 samples per pixel: the model is integrated over the pixel, which matters for
# undersampled images (FWHM < 2 px)
_SUB = np.array([-1.0, 0.0, 1.0]) / 3.0
_SUB_DX, _SUB_DY = (a.ravel() for a in np.meshgrid(_SUB, _SUB))

# parameters: amplitude, x0, y0, FWHM, u = 1/β, constant
N_PARAMS = 6
U_MIN, U_MAX = 0.02, 0.99  # β from ~1 to 50 (a Gaussian is the β → ∞ limit)


def moffat_fwhm(alpha: float, beta: float) -> float:
    """FWHM of a Moffat profile (pixels when α is in pixels)."""
    return 2.0 * alpha * math.sqrt(2.0 ** (1.0 / beta) - 1.0)


def moffat_pixels(
    p: np.ndarray, xs: np.ndarray, ys: np.ndarray, *, jac: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Circular Moffat (Moffat 1969, A&A 3, 455) averaged over sub-pixel samples.

    I(r) = A (1 + r²/α²)^-β + c with α² = FWHM² / (4 (2^(1/β) - 1)), parametrised by
    (A, x0, y0, FWHM, u = 1/β, c) so that u → 0 is the Gaussian limit and the FWHM stays
    put while the wings are fitted. ``p`` is (n, 6) for n stars; ``xs``/``ys`` are
    (samples, pixels) pixel-centre coordinates plus sub-pixel offsets, shared by all
    stars. Returns the (n, pixels) model and, with ``jac``, its (n, pixels, 6) Jacobian.
    """
    amp, x0, y0, fwhm, u, c = (p[:, k, None, None] for k in range(N_PARAMS))
    e = 2.0**u - 1.0
    alpha2 = fwhm**2 / (4.0 * e)
    dx, dy = xs[None] - x0, ys[None] - y0
    r2 = dx * dx + dy * dy
    q = 1.0 + r2 / alpha2
    logq = np.log(q)
    m = np.exp(-logq / u)  # q^-β

    def mean(a: np.ndarray) -> np.ndarray:  # over the sub-pixel samples
        return a.mean(axis=1)

    a2 = amp[..., 0]
    model = a2 * mean(m) + c[..., 0]
    if not jac:
        return model
    # ∂M/∂q = -M / (u q); the parameters' derivatives are that times ∂q/∂θ, with the
    # factors that do not vary over the samples taken out of the means
    t = m / q
    m_t_dx, m_t_dy, m_t_r2 = mean(t * dx), mean(t * dy), mean(t * r2)
    al2, uu = alpha2[..., 0], u[..., 0]
    d_alpha2 = a2 * m_t_r2 / (uu * al2**2)  # ∂model/∂α²
    cols = [
        mean(m),
        a2 * 2.0 * m_t_dx / (uu * al2),
        a2 * 2.0 * m_t_dy / (uu * al2),
        d_alpha2 * 2.0 * al2 / fwhm[..., 0],
        a2 * mean(m * logq) / uu**2 - d_alpha2 * al2 * (2.0**uu) * math.log(2.0) / e[..., 0],
        np.ones(model.shape),
    ]
    return model, np.stack(cols, axis=-1)


def fit_fwhm(
    stamps: np.ndarray,
    x0: np.ndarray,
    y0: np.ndarray,
    fwhm_guess: np.ndarray,
    *,
    max_iter: int = 60,
    rtol: float = 1e-6,
) -> np.ndarray:
    """FWHM (pixels) of the stars in ``stamps`` (n, ny, nx) from pixel-integrated
    circular Moffat fits; NaN where a fit fails or does not converge.

    ``x0``/``y0`` are the stars' positions in stamp pixels (0-based, pixel centres),
    ``fwhm_guess`` the starting FWHM. Unweighted least squares (bright stars: the
    background noise is the same in every pixel), solved by Levenberg–Marquardt
    (Marquardt 1963, SIAM J. Appl. Math. 11, 431) with Marquardt's diagonal scaling,
    each star with its own damping; bounds (|Δx|, |Δy| ≤ 2 px, FWHM ≥ 0.3 px,
    1/β in [0.02, 0.99], A ≥ 0) are kept by projection, a parameter pushed against
    its bound being held there for the step.
    """
    stamps = np.asarray(stamps, float)
    n, ny, nx = stamps.shape
    if n == 0:
        return np.zeros(0)
    x0 = np.asarray(x0, float)
    y0 = np.asarray(y0, float)
    yy, xx = np.mgrid[0:ny, 0:nx].astype(float)
    xs = xx.ravel()[None] + _SUB_DX[:, None]
    ys = yy.ravel()[None] + _SUB_DY[:, None]
    data = stamps.reshape(n, -1)
    fwhm0 = np.maximum(np.asarray(fwhm_guess, float), 1.0)
    amp0 = np.maximum(data.max(axis=1), 1e-6)
    p = np.column_stack([amp0, x0, y0, fwhm0, np.full(n, 0.25), np.zeros(n)])
    lo = np.column_stack(
        [np.zeros(n), x0 - 2, y0 - 2, np.full(n, 0.3), np.full(n, U_MIN), -np.inf * np.ones(n)]
    )
    hi = np.column_stack(
        [
            np.full(n, np.inf),
            x0 + 2,
            y0 + 2,
            np.full(n, 2.0 * max(nx, ny)),
            np.full(n, U_MAX),
            np.full(n, np.inf),
        ]
    )
    p = np.clip(p, lo, hi)
    model, jac = moffat_pixels(p, xs, ys, jac=True)
    resid = model - data
    cost = (resid**2).sum(axis=1)
    lam = np.full(n, 1e-3)
    active = np.ones(n, bool)  # still iterating
    converged = np.zeros(n, bool)
    moved = np.zeros(n, bool)  # at least one step accepted
    eye = np.eye(N_PARAMS)
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        J, r, pa = jac[idx], resid[idx], p[idx]
        grad = np.einsum("nmk,nm->nk", J, r)
        A = np.einsum("nmk,nml->nkl", J, J)
        # hold parameters at a bound that the gradient pushes outwards
        held = ((pa <= lo[idx]) & (grad > 0)) | ((pa >= hi[idx]) & (grad < 0))
        diag = np.einsum("nkk->nk", A).copy()
        diag = np.where(diag > 0, diag, 1.0)
        Ad = A + (lam[idx, None] * diag)[:, :, None] * eye
        free = ~held
        Ad *= free[:, :, None] & free[:, None, :]
        rows, cols = np.nonzero(held)
        Ad[rows, cols, cols] = 1.0
        g = np.where(held, 0.0, grad)
        try:
            step = np.linalg.solve(Ad, -g[..., None])[..., 0]
        except np.linalg.LinAlgError:
            step = np.zeros_like(g)
            for j in range(len(idx)):
                step[j] = np.linalg.lstsq(Ad[j], -g[j], rcond=None)[0]
        trial = np.clip(pa + step, lo[idx], hi[idx])
        t_model, t_jac = moffat_pixels(trial, xs, ys, jac=True)
        t_resid = t_model - data[idx]
        t_cost = (t_resid**2).sum(axis=1)
        better = np.isfinite(t_cost) & (t_cost <= cost[idx])
        acc = idx[better]
        small = np.abs(trial - pa) <= rtol * (np.abs(pa) + rtol)
        done = better & (
            small.all(axis=1) | (cost[idx] - t_cost <= rtol * np.maximum(cost[idx], 1e-300))
        )
        p[acc], resid[acc], jac[acc], cost[acc] = (
            trial[better],
            t_resid[better],
            t_jac[better],
            t_cost[better],
        )
        lam[acc] = np.maximum(lam[acc] / 10.0, 1e-9)
        moved[acc] = True
        rej = idx[~better]
        lam[rej] *= 10.0
        converged[idx[done]] = True
        active[idx[done]] = False
        # no descent left: at a minimum if a step was ever taken, else the start was
        # never improved on (a hopeless stamp) and is no measurement
        stuck = rej[lam[rej] > 1e10]
        active[stuck] = False
        converged[stuck] = moved[stuck]
    out = p[:, 3].copy()
    out[~converged | ~np.isfinite(cost)] = np.nan
    return out
