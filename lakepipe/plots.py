"""Figures users look at: a target's lightcurve and its cutout stamps.

Built with matplotlib's object API on the Agg canvas (no pyplot state, no display),
written atomically as PNG.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lakepipe.errors import UserError

# One colour per filter (ZTF convention: g green, r red, i dark orange).
FILTER_COLOURS = {"zg": "#2ca02c", "zr": "#d62728", "zi": "#8c564b"}
FALLBACK_COLOURS = ["#1f77b4", "#9467bd", "#e377c2", "#7f7f7f", "#17becf"]


def _save(fig: Figure, out: Path) -> Path:
    out = Path(out)
    if not out.parent.exists():
        raise UserError(f"output folder {out.parent} does not exist; create it")
    FigureCanvasAgg(fig)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, out)
    return out


LIMIT_ARROW_MAG = 0.4  # length of an upper-limit arrow, towards fainter magnitudes


def plot_lightcurve(rows: pa.Table, target: str, out: Path, *, t0_mjd: float | None = None) -> Path:
    """Magnitude vs time, error bars for detections, arrows for 5-sigma upper limits."""
    return _save(lightcurve_figure(rows, target, t0_mjd=t0_mjd), out)


def lightcurve_figure(rows: pa.Table, target: str, *, t0_mjd: float | None = None) -> Figure:
    """The figure of :func:`plot_lightcurve`: a colour per filter, brighter up; an upper
    limit is a bar at the limit with an arrow pointing down (fainter); time in days since
    T0, or MJD (UTC) without an offset."""
    data = [r for r in rows.to_pylist() if str(r["object_id"]) == str(target)]
    if not data:
        raise UserError(f"no lightcurve rows for target {target!r}")
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot()
    filters = sorted({r["filter"] for r in data})
    offset = t0_mjd or 0.0

    def t(rs: list[dict]) -> np.ndarray:
        return np.array([r["mjd"] for r in rs]) - offset

    for i, f in enumerate(filters):
        colour = FILTER_COLOURS.get(f, FALLBACK_COLOURS[i % len(FALLBACK_COLOURS)])
        det = [
            r for r in data if r["filter"] == f and not r["upper_limit"] and r["mag"] is not None
        ]
        lim = [r for r in data if r["filter"] == f and r["upper_limit"] and r["limit_mag"]]
        if det:
            ax.errorbar(
                t(det),
                [r["mag"] for r in det],
                yerr=[r["mag_err"] for r in det],
                fmt="o",
                ms=4,
                color=colour,
                label=f"{f} ({len(det)})",
                capsize=2,
            )
        if lim:
            tl = t(lim)
            ml = np.array([r["limit_mag"] for r in lim], dtype=float)
            ax.plot(tl, ml, ls="none", marker="_", ms=10, mew=1.5, color=colour, alpha=0.7,
                    label=f"{f} 5σ limit ({len(lim)})")  # fmt: skip
            for x, m in zip(tl, ml, strict=True):
                # the object is fainter than m: an arrow from the limit towards larger mag
                ax.annotate("", xy=(x, m + LIMIT_ARROW_MAG), xytext=(x, m),
                            arrowprops={"arrowstyle": "-|>", "color": colour, "alpha": 0.7,
                                        "lw": 1.2, "shrinkA": 0, "shrinkB": 0})  # fmt: skip
            ax.update_datalim(np.column_stack([tl, ml + LIMIT_ARROW_MAG + 0.1]))
    ax.autoscale_view()
    ax.invert_yaxis()  # brighter is up
    ax.ticklabel_format(axis="x", useOffset=False, style="plain")
    ax.xaxis.set_major_locator(MaxNLocator(6))
    system = next((r["mag_system"] for r in data if r.get("mag_system")), "")
    ax.set_ylabel(f"magnitude {f'({system})' if system else ''}")
    ax.set_xlabel(f"days since T0 (MJD {t0_mjd:.4f})" if t0_mjd is not None else "MJD (UTC)")
    ax.set_title(f"{target}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def plot_cutouts(
    cutouts: pa.Table,
    image_path: Callable[[str], Path],
    target: str,
    out: Path,
    *,
    position: tuple[float, float] | None = None,
    size_arcsec: float | None = 60.0,
    aperture_arcsec: float | None = None,
    max_stamps: int = 36,
) -> Path:
    """A grid of stamps of ``target`` (zscale), each with the aperture circle drawn.

    ``cutouts`` rows carry ``path``, ``exposure_id``, ``ra``/``dec`` (the cutout centre),
    and optionally ``mjd``, ``filter`` and ``aperture_arcsec`` (the radius the sources
    stage used on that image). ``position`` (ra, dec in deg) is where the target is, when
    it is not the cutout centre; ``size_arcsec`` crops each stamp around it (None: the
    whole cutout); ``aperture_arcsec`` overrides the per-image radius (else 5″).
    """
    from astropy.io import fits
    from astropy.nddata import Cutout2D
    from astropy.visualization import ZScaleInterval
    from astropy.wcs import WCS, FITSFixedWarning
    from matplotlib.patches import Circle

    rows = [r for r in cutouts.to_pylist() if r["path"]]
    if not rows:
        raise UserError(
            f"no cutout files for target {target!r}: it is neither a cutouts target_id nor "
            'an object on a cutout; see `lakepipe query "select distinct target_id from '
            'cutouts"` and the lightcurves table'
        )
    rows.sort(key=lambda r: (r.get("mjd") or 0.0, r["exposure_id"]))
    rows = rows[:max_stamps]
    ncol = min(6, len(rows))
    nrow = int(np.ceil(len(rows) / ncol))
    fig = Figure(figsize=(2.1 * ncol, 2.3 * nrow))
    for i, r in enumerate(rows):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        with fits.open(image_path(r["path"])) as hdul:
            hdu = next(h for h in hdul if h.data is not None)
            data = np.asarray(hdu.data, dtype=float)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FITSFixedWarning)  # non-standard cards
                wcs = WCS(hdu.header)
        ra, dec = position if position is not None else (r["ra"], r["dec"])
        x, y = (float(v) for v in wcs.world_to_pixel_values(ra, dec))
        scale = abs(wcs.proj_plane_pixel_scales()[0].to_value("arcsec")) or 1.0
        if size_arcsec:
            side = max(round(size_arcsec / scale), 8)
            cut = Cutout2D(data, (x, y), (side, side), mode="partial", fill_value=np.nan)
            data = cut.data
            x, y = cut.to_cutout_position((x, y))
        finite = np.isfinite(data)
        vmin, vmax = ZScaleInterval().get_limits(data[finite]) if finite.any() else (0, 1)
        ax.imshow(data, origin="lower", cmap="gray_r", vmin=vmin, vmax=vmax)
        radius = aperture_arcsec or r.get("aperture_arcsec") or 5.0
        ax.add_patch(Circle((x, y), radius / scale, fill=False, color="#d62728", lw=1))
        label = f"{r.get('filter') or ''} {r['mjd']:.3f}" if r.get("mjd") else str(r["exposure_id"])
        ax.set_title(label, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    what = f"aperture r = {aperture_arcsec:g}″" if aperture_arcsec else "the sources' apertures"
    crop = f", {size_arcsec:g}″ stamps" if size_arcsec else ""
    fig.suptitle(f"{target}: {len(rows)} images{crop} ({what})", fontsize=9)
    return _save(fig, out)
