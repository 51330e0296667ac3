"""Reference catalogues: every format returns the same rows, reads are pruned, PM applied."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table
from astropy.time import Time
from erfa import ErfaWarning

from lakepipe.astro.crossmatch import angular_separation_arcsec
from lakepipe.astro.healpix import degrade, healpix_index
from lakepipe.catalogs import (
    CatalogConfig,
    Cone,
    guess_kind,
    healpix_ranges,
    jyear_to_mjd,
    mjd_to_jyear,
    open_catalog,
    propagate_proper_motion,
)
from lakepipe.catalogs.hats import write_hats
from lakepipe.errors import InputNotFoundError

N_ROWS = 200_000
CONES = [Cone(359.8, 0.1, 2.0), Cone(10.0, 89.8, 2.0), Cone(150.0, -30.0, 1.5)]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pa.Table]:
    """One whole-sky catalogue written as HATS, sorted Parquet, CSV and FITS."""
    rng = np.random.default_rng(11)
    ra = rng.uniform(0.0, 360.0, N_ROWS)
    dec = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, N_ROWS)))
    table = pa.table(
        {
            "source_id": np.arange(N_ROWS, dtype=np.int64) * 7 + 3,
            "RAJ2000": ra,
            "DEJ2000": dec,
            "gmag": rng.uniform(12.0, 20.0, N_ROWS),
            "e_gmag": rng.uniform(0.001, 0.05, N_ROWS),
        }
    )
    d = tmp_path_factory.mktemp("refcat")
    write_hats(table, d / "hats", ra="RAJ2000", dec="DEJ2000", max_rows=4000, row_group_rows=500)
    h29 = healpix_index(ra, dec)
    sorted_t = table.append_column("_healpix_29", pa.array(h29)).sort_by("_healpix_29")
    pq.write_table(sorted_t, d / "sorted.parquet", row_group_size=2000)
    folder = d / "folder"
    folder.mkdir()
    for k in range(4):  # a folder of dec-sorted files, no HEALPix column
        part = table.slice(k * N_ROWS // 4, N_ROWS // 4).sort_by("DEJ2000")
        pq.write_table(part, folder / f"part-{k}.parquet", row_group_size=2000)
    small = table.slice(0, 50_000)
    pacsv.write_csv(small, d / "small.csv")
    Table(small.to_pydict()).write(d / "small.fits")
    return d, table


def _truth(table: pa.Table, cones: list[Cone], nrows: int | None = None) -> np.ndarray:
    t = table if nrows is None else table.slice(0, nrows)
    ra, dec = t.column("RAJ2000").to_numpy(), t.column("DEJ2000").to_numpy()
    keep = np.zeros(len(ra), dtype=bool)
    for c in cones:
        keep |= angular_separation_arcsec(ra, dec, c.ra, c.dec) <= c.radius_deg * 3600
    return np.sort(t.column("source_id").to_numpy()[keep])


def _config(path: Path, **kw: object) -> CatalogConfig:
    columns = {
        "ra": "RAJ2000",
        "dec": "DEJ2000",
        "id": "source_id",
        "mags": {"g": "gmag"},
        "mag_errs": {"g": "e_gmag"},
    }
    return CatalogConfig(path=str(path), columns=columns, **kw)


@pytest.mark.parametrize(
    ("name", "kind", "nrows"),
    [
        ("hats", "hats", None),
        ("sorted.parquet", "parquet", None),
        ("folder", "parquet", None),
        ("small.csv", "csv", 50_000),
        ("small.fits", "fits", 50_000),
    ],
)
def test_every_format_returns_the_cone_rows(
    catalog: tuple[Path, pa.Table], name: str, kind: str, nrows: int | None
) -> None:
    """Truth: brute-force separations over the whole table; poles and RA wrap included."""
    d, table = catalog
    assert guess_kind(d / name) == kind
    cat = open_catalog(_config(d / name))
    ref = cat.read(CONES)
    expected = _truth(table, CONES, nrows)
    assert expected.size > 20
    np.testing.assert_array_equal(np.sort(ref.column("ref_id").to_numpy()), expected)
    assert ref.column_names == [
        "ref_id", "ra", "dec", "pmra", "pmdec", "epoch_jyear", "mag_g", "mag_err_g"
    ]  # fmt: skip
    # magnitudes travel with their row
    # source_id = 7 * row + 3, so the row of each returned id is known
    rows = (ref.column("ref_id").to_numpy() - 3) // 7
    np.testing.assert_array_equal(
        ref.column("mag_g").to_numpy(), table.column("gmag").to_numpy()[rows]
    )
    np.testing.assert_array_equal(ref.column("mag_err_g").to_numpy(),
                                  table.column("e_gmag").to_numpy()[rows])  # fmt: skip


def test_hats_reads_few_partitions_and_row_groups(catalog: tuple[Path, pa.Table]) -> None:
    """A 0.3° cone touches a handful of the HATS partitions and row groups, never all."""
    d, table = catalog
    cat = open_catalog(_config(d / "hats"))
    ref = cat.read([Cone(150.0, -30.0, 0.3)])
    s = cat.stats
    assert ref.num_rows == _truth(table, [Cone(150.0, -30.0, 0.3)]).size
    assert s.files_total >= 48  # adaptive tiling split the sky
    assert 1 <= s.files_read <= 2
    assert s.row_groups_read <= 3
    assert s.rows_read <= 3 * 500
    # the partitions on disk are those partition_info.csv lists
    info = pacsv.read_csv(d / "hats" / "partition_info.csv")
    assert info.num_rows == s.files_total
    meta = pq.ParquetFile(s.files[0]).metadata
    assert meta.num_rows <= 4000  # max_rows per partition honoured


def test_parquet_prunes_row_groups(catalog: tuple[Path, pa.Table]) -> None:
    """HEALPix-sorted file: row-group statistics of _healpix_29 prune; dec-sorted folder:
    Dec statistics prune. Counts come from the Parquet metadata of what was opened."""
    d, _ = catalog
    cone = [Cone(150.0, -30.0, 0.3)]
    cat = open_catalog(_config(d / "sorted.parquet"))
    cat.read(cone)
    total = pq.ParquetFile(d / "sorted.parquet").metadata.num_row_groups
    assert cat.stats.row_groups_total == total == 100
    assert cat.stats.row_groups_read <= 3

    cat = open_catalog(_config(d / "folder"))
    cat.read(cone)
    assert cat.stats.files_total == 4
    assert cat.stats.row_groups_total == 100
    assert cat.stats.row_groups_read <= 8  # one or two Dec slices per file


def test_healpix_ranges_cover_the_cone() -> None:
    """Every point inside a cone falls in one of the order-29 ranges; the cover is small."""
    rng = np.random.default_rng(3)
    for cone in [Cone(0.0, 0.0, 1.0), Cone(200.0, 89.9, 0.2), Cone(45.0, -45.0, 0.01)]:
        ranges = healpix_ranges([cone])
        assert len(ranges) <= 64
        ra = (cone.ra + rng.uniform(-3, 3, 20000) * cone.radius_deg) % 360
        dec = np.clip(cone.dec + rng.uniform(-1.2, 1.2, 20000) * cone.radius_deg, -90, 90)
        inside = angular_separation_arcsec(ra, dec, cone.ra, cone.dec) <= cone.radius_deg * 3600
        h = healpix_index(ra[inside], dec[inside])
        pos = np.searchsorted(ranges[:, 0], h, side="right") - 1
        assert np.all((pos >= 0) & (h < ranges[pos, 1]))
        # the cover is at most ~4x the cone area (order-29 pixels counted)
        covered = float(np.sum(ranges[:, 1] - ranges[:, 0])) / (12 * 4.0**29) * 4 * np.pi
        area = 2 * np.pi * (1 - np.cos(np.radians(cone.radius_deg)))
        assert covered < 6 * area


def test_write_hats_adaptive_partitions(tmp_path: Path) -> None:
    """Dense sky is split deeper; partitions tile the rows exactly once."""
    rng = np.random.default_rng(5)
    ra = np.concatenate([rng.uniform(0, 360, 5000), rng.normal(150, 0.1, 5000)])
    dec = np.concatenate([np.degrees(np.arcsin(rng.uniform(-1, 1, 5000))),
                          rng.normal(2, 0.1, 5000)])  # fmt: skip
    parts = write_hats(pa.table({"ra": ra, "dec": dec}), tmp_path / "c", max_rows=1000)
    orders = {o for o, _ in parts}
    assert min(orders) <= 1 and max(orders) >= 4
    total = 0
    for order, pix in parts:
        path = next(
            (tmp_path / "c" / "dataset" / f"Norder={order}").glob(f"Dir=*/Npix={pix}.parquet")
        )
        t = pq.read_table(path)
        h = t.column("_healpix_29").to_numpy()
        assert np.all(degrade(h, order) == pix) and np.all(np.diff(h) >= 0)
        assert t.num_rows <= 1000 or order == 10
        total += t.num_rows
    assert total == 10_000
    assert "hats_col_ra=ra" in (tmp_path / "c" / "hats.properties").read_text()


def test_proper_motion_known_answers() -> None:
    """Truth: geometry by hand and astropy's apply_space_motion (ERFA pmsafe)."""
    # 1°/yr north from the equator for one year: tan(dec) = μ t exactly (tangent-plane motion)
    ra, dec = propagate_proper_motion(0.0, 0.0, 0.0, 3.6e6, 1.0)
    assert dec == pytest.approx(np.degrees(np.arctan(np.radians(1.0))), abs=1e-12)
    assert ra == pytest.approx(0.0, abs=1e-12)
    # across the north pole: a star 1" from the pole moving 2"/yr toward it, along RA=0
    ra, dec = propagate_proper_motion(0.0, 90.0 - 1 / 3600, 0.0, 2000.0, 1.0)
    assert dec == pytest.approx(90.0 - 1 / 3600, abs=1e-9)
    assert ra == pytest.approx(180.0, abs=1e-6)
    # across RA = 0: eastward 1"/yr at dec 60 for 10 yr from RA 359.999 deg
    ra, dec = propagate_proper_motion(359.999, 60.0, 1000.0, 0.0, 10.0)
    assert ra == pytest.approx((359.999 + 10 / 3600 / 0.5) % 360, abs=1e-7)

    # Barnard's star (Gaia DR3 values), 2016.0 -> 2025.5, against ERFA's rigorous model
    ra0, dec0, pmra, pmdec = 269.44850252543836, 4.739420051112412, -801.551, 10362.394
    star = SkyCoord(ra=ra0 * u.deg, dec=dec0 * u.deg, pm_ra_cosdec=pmra * u.mas / u.yr,
                    pm_dec=pmdec * u.mas / u.yr, distance=1e9 * u.pc,
                    radial_velocity=0 * u.km / u.s,
                    obstime=Time(2016.0, format="jyear", scale="tcb"))  # fmt: skip
    with warnings.catch_warnings():
        # ERFA notes that it overrides a tiny parallax; the distance is only a stand-in for ∞
        warnings.simplefilter("ignore", ErfaWarning)
        moved = star.apply_space_motion(new_obstime=Time(2025.5, format="jyear", scale="tcb"))
    ra, dec = propagate_proper_motion(ra0, dec0, pmra, pmdec, 9.5)
    assert angular_separation_arcsec(ra, dec, moved.ra.deg, moved.dec.deg) < 1e-5  # < 10 µas
    assert angular_separation_arcsec(ra, dec, ra0, dec0) == pytest.approx(98.9, abs=0.2)


def test_epochs() -> None:
    """IAU Julian epochs: J2000.0 = MJD 51544.5; Gaia DR3's J2016.0 = JD 2457389.0."""
    assert jyear_to_mjd(2000.0) == 51544.5
    assert jyear_to_mjd(2016.0) == 57388.5
    assert mjd_to_jyear(57388.5) == 2016.0


def test_read_applies_proper_motion_at_exposure_epoch(tmp_path: Path) -> None:
    """A fast star outside the cone at 2016.0 moves inside by the exposure epoch (2025.0)."""
    pmdec = 8000.0  # mas/yr: 72" in 9 yr
    t = pa.table({"id": ["fast", "still"], "ra": [10.0, 10.0],
                  "dec": [-60 / 3600, 0.0], "pmra": [0.0, 0.0], "pmdec": [pmdec, 0.0],
                  "g": [12.0, 13.0]})  # fmt: skip
    pq.write_table(t, tmp_path / "pm.parquet")
    cfg = CatalogConfig(path="pm.parquet", columns={"id": "id", "mags": {"g": "g"},
                        "pmra": "pmra", "pmdec": "pmdec", "epoch": 2016.0})  # fmt: skip
    cat = open_catalog(cfg, base_dir=tmp_path)  # default max_pm_mas_yr covers Barnard's star
    cone = [Cone(10.0, 10 / 3600, 20 / 3600)]
    at_2016 = cat.read(cone, epoch_mjd=jyear_to_mjd(2016.0))
    at_2025 = cat.read(cone, epoch_mjd=jyear_to_mjd(2025.0))
    assert at_2016.num_rows == 1  # only the still star
    assert at_2025.num_rows == 2
    fast = at_2025.filter(pa.compute.equal(at_2025.column("mag_g"), 12.0))
    # tangent-plane motion: 12" minus a 3 µas projection term
    assert fast.column("dec")[0].as_py() * 3600 == pytest.approx(-60 + 72, abs=1e-4)
    assert fast.column("epoch_jyear")[0].as_py() == pytest.approx(2025.0)
    # string ids hash to stable int64s
    ids = at_2025.column("ref_id").to_pylist()
    assert len(set(ids)) == 2 and all(i >= 0 for i in ids)
    assert ids == cat.read(cone, epoch_mjd=jyear_to_mjd(2025.0)).column("ref_id").to_pylist()


def test_bad_configs(tmp_path: Path) -> None:
    """Missing files and unmapped columns are user errors naming what exists."""
    with pytest.raises(InputNotFoundError, match="not found"):
        open_catalog(CatalogConfig(path=str(tmp_path / "nope.parquet")))
    pq.write_table(pa.table({"RA": [1.0], "DEC": [1.0]}), tmp_path / "c.parquet")
    cat = open_catalog(CatalogConfig(path=str(tmp_path / "c.parquet")))
    with pytest.raises(InputNotFoundError, match="Available: RA, DEC"):
        cat.read([Cone(1.0, 1.0, 0.1)])
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(InputNotFoundError, match="set catalog kind"):
        open_catalog(CatalogConfig(path=str(tmp_path / "c.txt")))


def test_cds_knobs_in_the_catalog_config(tmp_path: Path) -> None:
    """`catalog: {kind: cds}` carries the CdsParams knobs of a cone read; other kinds refuse them;
    an unknown key gets a did-you-mean from the spec loader."""
    from lakepipe.archives.cds import CdsCatalog, CdsParams
    from lakepipe.errors import SpecError
    from lakepipe.spec import load_spec

    cfg = CatalogConfig(
        kind="cds",
        table="I/350/gaiaedr3",
        vizier_url="http://127.0.0.1:9/viz",
        row_limit=7,
        http={"rate_limit_per_s": 2.0, "contact": "me@example.org"},
    )
    cat = open_catalog(cfg)
    assert isinstance(cat, CdsCatalog)
    assert cat.client.params == CdsParams(
        table="I/350/gaiaedr3",
        vizier_url="http://127.0.0.1:9/viz",
        row_limit=7,
        http={"rate_limit_per_s": 2.0, "contact": "me@example.org"},
    )
    # the catalog reads by cone: XMatch upload knobs belong to CdsClient.xmatch callers
    with pytest.raises(ValueError, match="xmatch_url"):
        CatalogConfig(kind="cds", xmatch_url="http://127.0.0.1:9/xm")
    # one place for defaults: an empty cds config is CdsParams()
    assert CatalogConfig(kind="cds").cds_params() == CdsParams()
    with pytest.raises(ValueError, match="row_limit: only for catalog kind 'cds'"):
        CatalogConfig(kind="archive", row_limit=5)
    with pytest.raises(ValueError, match="must not carry a login") as err:
        CatalogConfig(kind="cds", vizier_url="https://u:pw-x@vizier.example.org")
    assert "pw-x" not in str(err.value).split("input_value")[0]
    spec = tmp_path / "s.yaml"
    spec.write_text(
        "name: s\nstages:\n  crossmatches: {kind: crossmatch, catalog: {kind: cds,"
        " vizier_ur: 'http://127.0.0.1:9'}, radius_arcsec: 1.0}\n"
    )
    with pytest.raises(SpecError, match="Did you mean 'vizier_url'"):
        load_spec(spec)
