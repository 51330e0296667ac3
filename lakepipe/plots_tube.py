"""The ephemeris-tube figure: tube nodes, the exposure footprints it crosses, detections.

Matplotlib object API on the Agg canvas, written atomically as PNG (as :mod:`lakepipe.plots`).
The sky is drawn in a local tangent plane (gnomonic projection about the tube's mean
centre), offsets in arcminutes, east to the left as on the sky.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from matplotlib.figure import Figure

from lakepipe.errors import UserError
from lakepipe.plots import _save


def _tangent(ra0: float, dec0: float, ra, dec) -> tuple[np.ndarray, np.ndarray]:
    """Gnomonic (xi east, eta north) in arcmin about (ra0, dec0)."""
    from lakepipe.astro.wcs import tangent_plane

    xi, eta, _ = tangent_plane(np.asarray(ra, float), np.asarray(dec, float), ra0, dec0)
    return xi * 60.0, eta * 60.0


def plot_tube(
    nodes: pa.Table,
    out: Path,
    *,
    designation: str,
    footprints: pa.Table | None = None,
    detections: pa.Table | None = None,
    truth: pa.Table | None = None,
) -> Path:
    """Draw an object's tube and write a PNG.

    ``nodes``: ``tube_nodes`` rows (``mjd, ra, dec, radius_arcsec``) of the object;
    ``footprints``: planned exposures (``exposure_id, mjd`` and corners ``ra1..dec4``);
    ``detections``: rows with ``ra, dec``, ``accepted`` and ``exposure_id`` (recoveries);
    ``truth``: optional ``ra, dec`` to overlay. Tube circles are drawn to scale; colour
    runs with time. Footprints are shaded (overlaps darker: a footprint is usually much
    larger than the tube, so mostly its edges and shading show) and have a legend entry;
    planned exposures without an accepted detection are ringed at the tube centre of
    their mid-time.
    """
    from matplotlib import colormaps
    from matplotlib.patches import Circle, Patch, Polygon

    if nodes.num_rows == 0:
        raise UserError(f"no tube nodes for {designation!r}; run the tube stage first")
    order = np.argsort(np.asarray(nodes.column("mjd")))
    mjd = np.asarray(nodes.column("mjd"))[order]
    ra = np.asarray(nodes.column("ra"))[order]
    dec = np.asarray(nodes.column("dec"))[order]
    rad = np.asarray(nodes.column("radius_arcsec"))[order] / 60.0
    v = np.stack([np.cos(np.radians(dec)) * np.cos(np.radians(ra)),
                  np.cos(np.radians(dec)) * np.sin(np.radians(ra)),
                  np.sin(np.radians(dec))], axis=1).mean(axis=0)  # fmt: skip
    ra0 = float(np.degrees(np.arctan2(v[1], v[0])) % 360.0)
    dec0 = float(np.degrees(np.arctan2(v[2], np.hypot(v[0], v[1]))))
    x, y = _tangent(ra0, dec0, ra, dec)
    fig = Figure(figsize=(7.5, 6.5))
    ax = fig.add_subplot()
    legend_extra = []
    if footprints is not None and footprints.num_rows:
        for row in footprints.to_pylist():
            fx, fy = _tangent(ra0, dec0, [row[f"ra{k}"] for k in range(1, 5)],
                              [row[f"dec{k}"] for k in range(1, 5)])  # fmt: skip
            ax.add_patch(Polygon(np.stack([fx, fy], 1), closed=True, lw=0.6, ec="0.45",
                                 fc="0.5", alpha=0.08, zorder=1))  # fmt: skip
        label = f"planned exposure footprints ({footprints.num_rows})"
        legend_extra.append(Patch(fc="0.5", ec="0.45", alpha=0.3, label=label))
    colours = (mjd - mjd.min()) / max(float(np.ptp(mjd)), 1e-9)
    cm = colormaps["viridis"]
    for xi, yi, ri, ci in zip(x, y, rad, colours, strict=True):
        ax.add_patch(Circle((xi, yi), ri, fill=False, lw=0.8, ec=cm(ci), alpha=0.8))
    sc = ax.scatter(x, y, c=mjd, cmap="viridis", s=6, zorder=3, label="tube centre")
    fig.colorbar(sc, ax=ax, label="MJD (UTC)", shrink=0.6)
    if detections is not None and detections.num_rows:
        acc = np.asarray(detections.column("accepted").to_pylist(), bool)
        dx, dy = _tangent(ra0, dec0, detections.column("ra"), detections.column("dec"))
        ax.scatter(dx[acc], dy[acc], marker="+", s=60, c="#d62728", zorder=4,
                   label=f"accepted detections ({int(acc.sum())})")  # fmt: skip
        if (~acc).any():
            ax.scatter(dx[~acc], dy[~acc], marker="x", s=30, c="0.3", zorder=4,
                       label=f"rejected candidates ({int((~acc).sum())})")  # fmt: skip
    if footprints is not None and footprints.num_rows and "mjd" in footprints.column_names:
        found: set[int] = set()
        if detections is not None and detections.num_rows:
            found = {
                int(e)
                for e, a in zip(detections.column("exposure_id").to_pylist(),
                                detections.column("accepted").to_pylist(), strict=True)
                if a
            }  # fmt: skip
        fmjd = np.asarray(footprints.column("mjd").to_pylist(), float)
        eids = footprints.column("exposure_id").to_pylist()
        miss = np.array([int(e) not in found for e in eids], bool)
        if miss.any():
            mx, my = np.interp(fmjd[miss], mjd, x), np.interp(fmjd[miss], mjd, y)
            ax.scatter(mx, my, s=90, facecolors="none", edgecolors="#ff7f0e", lw=1.4,
                       zorder=5, label=f"planned, no detection ({int(miss.sum())})")  # fmt: skip
    if truth is not None and truth.num_rows:
        tx, ty = _tangent(ra0, dec0, truth.column("ra"), truth.column("dec"))
        ax.plot(tx, ty, ".", ms=2, c="k", label="truth", zorder=2)
    pad = float(rad.max()) + 2.0
    ax.set_xlim(float(x.max()) + pad, float(x.min()) - pad)  # east to the left
    ax.set_ylim(float(y.min()) - pad, float(y.max()) + pad)
    ax.set_aspect("equal")
    ax.set_xlabel(f"east offset (arcmin) from RA {ra0:.4f}")
    ax.set_ylabel(f"north offset (arcmin) from Dec {dec0:+.4f}")
    ax.set_title(f"{designation}: ephemeris tube ({nodes.num_rows} nodes)")
    ax.grid(alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=handles + legend_extra, fontsize=8, loc="best")
    return _save(fig, out)
