"""Positional crossmatch of two sky catalogues: nearest counterpart or all pairs in a radius.

Method: positions become 3-D unit vectors; the angular radius θ becomes the chord
``2 sin(θ/2)`` and a :class:`scipy.spatial.cKDTree` finds neighbours by chord length,
which is monotonic in angle, so the nearest neighbour by chord is the nearest on the sky.
Unit vectors have no coordinate singularity: matching is correct at the poles and across
RA = 0/360 without special cases.

For speed and memory on 10⁶ × 10⁶ inputs both sets are sorted by declination and cut
into bands of ``band_rows`` left rows; each band builds a small tree from the right rows
whose declination lies within the band ± the radius (every counterpart must, because
``|Δdec| <= separation``). Small trees fit in cache, both sides are ordered by small sky
cells inside their band, and bands run in parallel threads (cKDTree releases the GIL). This is
the spatially-bucketed KD-tree approach of LSDB's ``kdtree_match`` done per declination
band instead of per HEALPix pixel.

Separations reported are great-circle angles from the Vincenty formula (as astropy's
``angular_separation``; Vincenty 1975, Survey Review 23, 88), in arcsec.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
from scipy.spatial import cKDTree

from lakepipe.config import usable_cores

MatchMode = Literal["nearest", "all"]

DEFAULT_BAND_ROWS = 16_384
_CHORD_SLACK = 1.0 + 1e-9  # widen the chord a hair; exact radius is applied on the angle


@dataclass(frozen=True)
class Matches:
    """Matched pairs: ``idx1[k]`` (left row) ↔ ``idx2[k]`` (right row).

    Sorted by left row, then by separation. ``rank`` is 1 for the nearest counterpart of
    a left row, 2 for the next, … (always 1 in ``nearest`` mode).
    """

    idx1: np.ndarray
    idx2: np.ndarray
    sep_arcsec: np.ndarray
    rank: np.ndarray

    def __len__(self) -> int:
        return len(self.idx1)

    @classmethod
    def empty(cls) -> Matches:
        """No pairs."""
        i = np.empty(0, dtype=np.int64)
        return cls(i, i.copy(), np.empty(0, dtype=np.float64), np.empty(0, dtype=np.int32))


def unit_vectors(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    """(n, 3) Cartesian unit vectors of (ra, dec) in degrees."""
    ra = np.radians(np.asarray(ra_deg, dtype=np.float64))
    dec = np.radians(np.asarray(dec_deg, dtype=np.float64))
    out = np.empty((ra.size, 3), dtype=np.float64)
    cos_dec = np.cos(dec)
    np.multiply(cos_dec, np.cos(ra), out=out[:, 0])
    np.multiply(cos_dec, np.sin(ra), out=out[:, 1])
    np.sin(dec, out=out[:, 2])
    return out


def angular_separation_arcsec(
    ra1_deg: np.ndarray, dec1_deg: np.ndarray, ra2_deg: np.ndarray, dec2_deg: np.ndarray
) -> np.ndarray:
    """Great-circle separation in arcsec (Vincenty formula; accurate at all angles)."""
    lon1 = np.radians(np.asarray(ra1_deg, dtype=np.float64))
    lat1 = np.radians(np.asarray(dec1_deg, dtype=np.float64))
    lon2 = np.radians(np.asarray(ra2_deg, dtype=np.float64))
    lat2 = np.radians(np.asarray(dec2_deg, dtype=np.float64))
    dlon = lon2 - lon1
    s1, c1 = np.sin(lat1), np.cos(lat1)
    s2, c2 = np.sin(lat2), np.cos(lat2)
    sdl, cdl = np.sin(dlon), np.cos(dlon)
    num1 = c2 * sdl
    num2 = c1 * s2 - s1 * c2 * cdl
    den = s1 * s2 + c1 * c2 * cdl
    return np.degrees(np.arctan2(np.hypot(num1, num2), den)) * 3600.0


def chord_radius(radius_arcsec: float) -> float:
    """Chord length between unit vectors ``radius_arcsec`` apart: 2 sin(θ/2)."""
    return 2.0 * np.sin(np.radians(radius_arcsec / 3600.0) / 2.0)


def _finite_sorted_by_dec(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Indices of rows with finite coordinates, sorted by declination."""
    finite = np.isfinite(ra) & np.isfinite(dec)
    if finite.all():
        return np.argsort(dec)  # ties need no order: results are re-sorted by row
    ok = np.flatnonzero(finite)
    return ok[np.argsort(dec[ok])]


def crossmatch(
    ra1_deg: np.ndarray,
    dec1_deg: np.ndarray,
    ra2_deg: np.ndarray,
    dec2_deg: np.ndarray,
    radius_arcsec: float,
    *,
    mode: MatchMode = "nearest",
    workers: int | None = None,
    band_rows: int = DEFAULT_BAND_ROWS,
) -> Matches:
    """Match left positions (1) against right positions (2) within ``radius_arcsec``.

    Parameters
    ----------
    ra1_deg, dec1_deg, ra2_deg, dec2_deg
        ICRS positions in degrees; rows with NaN coordinates never match.
    radius_arcsec
        Match radius (arcsec), inclusive.
    mode
        ``nearest``: the nearest right row of each left row, if within the radius
        (identical to astropy's ``match_to_catalog_sky`` cut at the radius).
        ``all``: every pair within the radius, ranked by separation per left row.
    workers
        Threads (default: all cores). Results do not depend on it.
    band_rows
        Left rows per declination band (a tuning knob; results do not depend on it).

    Returns
    -------
    Matches
        Index arrays into the inputs, separations (arcsec) and ranks.
    """
    if mode not in ("nearest", "all"):
        raise ValueError(f"mode must be 'nearest' or 'all' (got {mode!r})")
    if not radius_arcsec > 0:
        raise ValueError(f"radius_arcsec must be > 0 (got {radius_arcsec})")
    ra1 = np.asarray(ra1_deg, dtype=np.float64).ravel()
    dec1 = np.asarray(dec1_deg, dtype=np.float64).ravel()
    ra2 = np.asarray(ra2_deg, dtype=np.float64).ravel()
    dec2 = np.asarray(dec2_deg, dtype=np.float64).ravel()
    if ra1.shape != dec1.shape or ra2.shape != dec2.shape:
        raise ValueError("ra and dec arrays must have the same length")

    o1 = _finite_sorted_by_dec(ra1, dec1)
    o2 = _finite_sorted_by_dec(ra2, dec2)
    if o1.size == 0 or o2.size == 0:
        return Matches.empty()
    r1, d1 = ra1[o1], dec1[o1]
    r2, d2 = ra2[o2], dec2[o2]
    radius_deg = radius_arcsec / 3600.0
    chord = chord_radius(radius_arcsec) * _CHORD_SLACK
    edges = [*range(0, o1.size, max(1, band_rows)), o1.size]

    def band(k: int) -> tuple[np.ndarray, np.ndarray] | None:
        a, b = edges[k], edges[k + 1]
        lo = int(np.searchsorted(d2, d1[a] - radius_deg, side="left"))
        hi = int(np.searchsorted(d2, d1[b - 1] + radius_deg, side="right"))
        if hi <= lo:
            return None
        # inside the band, both sides in cells about as wide as the band is tall (by Dec
        # within a cell): neighbours in memory are neighbours on the sky (cache locality)
        cell_deg = max(d1[b - 1] - d1[a], 1e-6) / max(
            np.cos(np.radians(0.5 * (d1[a] + d1[b - 1]))), 1e-3
        )
        q = a + np.argsort(np.floor(r1[a:b] / cell_deg) * 1e3 + (d1[a:b] - d1[a]))
        p = lo + np.argsort(np.floor(r2[lo:hi] / cell_deg) * 1e3 + (d2[lo:hi] - d1[a]))
        x1 = unit_vectors(r1[q], d1[q])
        tree = cKDTree(
            unit_vectors(r2[p], d2[p]),
            leafsize=16,
            balanced_tree=False,  # sliding midpoint: faster to build, as fast to query
            compact_nodes=False,
            copy_data=False,
        )
        if mode == "nearest":
            dist, j = tree.query(x1, k=1, distance_upper_bound=chord)
            hit = np.isfinite(dist)
            return q[hit], p[j[hit]]
        qtree = cKDTree(x1, leafsize=16, balanced_tree=False, compact_nodes=False, copy_data=False)
        pairs = qtree.sparse_distance_matrix(tree, chord, output_type="ndarray")
        return q[pairs["i"]], p[pairs["j"]]

    nworkers = max(1, workers if workers is not None else usable_cores())
    if nworkers == 1 or len(edges) <= 2:
        results = [band(k) for k in range(len(edges) - 1)]
    else:
        with ThreadPoolExecutor(max_workers=nworkers) as pool:
            results = list(pool.map(band, range(len(edges) - 1)))
    found = [r for r in results if r is not None and r[0].size]
    if not found:
        return Matches.empty()
    s1 = np.concatenate([r[0] for r in found])
    s2 = np.concatenate([r[1] for r in found])
    sep = angular_separation_arcsec(r1[s1], d1[s1], r2[s2], d2[s2])
    keep = sep <= radius_arcsec
    i1, i2, sep = o1[s1[keep]], o2[s2[keep]], sep[keep]
    if mode == "nearest":  # one pair per left row: scatter into row order, O(n)
        slot = np.full(ra1.size, -1, dtype=np.int64)
        slot[i1] = np.arange(i1.size)
        order = slot[slot >= 0]
        return Matches(i1[order], i2[order], sep[order], np.ones(order.size, dtype=np.int32))
    order = np.lexsort((i2, sep, i1))  # by left row, then separation, then right row
    i1, i2, sep = i1[order], i2[order], sep[order]
    return Matches(i1, i2, sep, _ranks(i1))


def _ranks(sorted_keys: np.ndarray) -> np.ndarray:
    """1-based position of each element within its run of equal keys."""
    n = sorted_keys.size
    if n == 0:
        return np.empty(0, dtype=np.int32)
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    run_start = np.repeat(starts, np.diff(np.r_[starts, n]))
    return (np.arange(n) - run_start + 1).astype(np.int32)


def crossmatch_tables(
    left: pa.Table,
    right: pa.Table,
    radius_arcsec: float,
    *,
    mode: MatchMode = "nearest",
    left_columns: Sequence[str] | None = None,
    right_columns: Sequence[str] | None = None,
    left_coords: tuple[str, str] = ("ra", "dec"),
    right_coords: tuple[str, str] = ("ra", "dec"),
    right_prefix: str = "ref_",
    keep_unmatched: bool = False,
    workers: int | None = None,
) -> pa.Table:
    """Arrow-level crossmatch: one row per pair with both sides' columns.

    Left columns keep their names; right columns get ``right_prefix``. Adds
    ``sep_arcsec`` (float64) and ``match_rank`` (int32, 1 = nearest). With
    ``keep_unmatched``, left rows without a counterpart appear once with nulls
    on the right (a left join); otherwise they are dropped.
    """
    m = crossmatch(
        left.column(left_coords[0]).to_numpy(zero_copy_only=False),
        left.column(left_coords[1]).to_numpy(zero_copy_only=False),
        right.column(right_coords[0]).to_numpy(zero_copy_only=False),
        right.column(right_coords[1]).to_numpy(zero_copy_only=False),
        radius_arcsec,
        mode=mode,
        workers=workers,
    )
    lcols = list(left_columns) if left_columns is not None else left.column_names
    rcols = list(right_columns) if right_columns is not None else right.column_names
    idx1 = pa.array(m.idx1, type=pa.int64())
    idx2 = pa.array(m.idx2, type=pa.int64())
    sep = pa.array(m.sep_arcsec, type=pa.float64())
    rank = pa.array(m.rank, type=pa.int32())
    if keep_unmatched:
        missing = np.setdiff1d(np.arange(left.num_rows), m.idx1)
        if missing.size:
            idx1 = pa.array(np.concatenate([m.idx1, missing]), type=pa.int64())
            nulls = pa.nulls(missing.size, pa.int64())
            idx2 = pa.concat_arrays([idx2, nulls])
            sep = pa.concat_arrays([sep, pa.nulls(missing.size, pa.float64())])
            rank = pa.concat_arrays([rank, pa.nulls(missing.size, pa.int32())])
    out = {name: left.column(name).take(idx1) for name in lcols}
    for name in rcols:
        out[right_prefix + name] = right.column(name).take(idx2)
    out["sep_arcsec"] = sep
    out["match_rank"] = rank
    table = pa.table(out)
    if keep_unmatched and len(table):
        table = table.take(pa.array(np.argsort(idx1.to_numpy(), kind="stable")))
    return table
