"""crossmatch and calibrate stage cores on the virtual survey.

The detections are the survey's truth (true flux and position of every star, variable
and appeared source rendered on an exposure) observed with CCD-equation noise: flux
errors from photon, sky and read noise in a 1.5 FWHM-radius aperture, 0.1" position
noise, S/N >= 5 kept. The reference catalogue is the survey's own Gaia-like catalogue
(positions at J2016.0 with proper motions; survey magnitudes from G and BP-RP through
the survey's colour model). Truth checked: each star matches its own catalogue entry,
appeared sources match nothing, and fitted zeropoints equal the exposures' MAGZP.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from lakepipe.archives.sim import SimArchive
from lakepipe.catalogs import CatalogConfig, open_catalog
from lakepipe.sim.catalog import COLOUR_TERMS
from lakepipe.stages.calibrate import CalibrateParams, calibrate_night
from lakepipe.stages.crossmatch import BandMap, match_sources
from lakepipe.tables import get_contract

BANDS = {
    f: BandMap(band="G", colour="bp_rp", colour_term=b, colour_pivot=0.82, offset_mag=a)
    for f, (a, b) in COLOUR_TERMS.items()
}
COLUMNS = {
    "id": "source_id",
    "mags": {"G": "phot_g_mean_mag", "bp_rp": "bp_rp"},
    "pmra": "pmra",
    "pmdec": "pmdec",
    "epoch": "ref_epoch",
}


def observed_sources(archive: SimArchive, exposures: pa.Table, seed: int) -> pa.Table:
    """A ``sources`` table: truth fluxes and positions seen with CCD-equation noise."""
    rng = np.random.default_rng(seed)
    pieces = []
    for e in exposures.to_pylist():
        t = archive.truth(e["exposure_id"])
        kinds = np.array(t.column("kind").to_pylist())
        t = t.filter(pa.array(np.isin(kinds, ["star", "variable", "appeared", "transient"])))
        flux = t.column("flux_adu").to_numpy()
        fwhm_pix = e["seeing_fwhm_arcsec"] / e["pixscale_arcsec"]
        npix = math.pi * (1.5 * fwhm_pix) ** 2
        gain = e["gain_e_per_adu"]
        var = flux / gain + npix * (e["sky_adu"] / gain + (e["rdnoise_e"] / gain) ** 2)
        flux_err = np.sqrt(var)
        obs = flux + rng.normal(0.0, flux_err)
        snr = obs / flux_err
        keep = snr >= 5.0
        n = int(keep.sum())
        pos_sig = 0.1 / 3600.0
        dec = t.column("dec").to_numpy()[keep] + rng.normal(0.0, pos_sig, n)
        ra = t.column("ra").to_numpy()[keep] + rng.normal(0.0, pos_sig, n) / np.cos(np.radians(dec))
        sat = t.column("saturated").to_numpy(zero_copy_only=False)[keep]
        mag_inst = -2.5 * np.log10(obs[keep])
        pieces.append(
            pa.table(
                {
                    "night": [e["night"]] * n,
                    "source_id": e["exposure_id"] % 10**9 * 100_000 + np.arange(n),
                    "exposure_id": np.full(n, e["exposure_id"]),
                    "ra": ra % 360.0,
                    "dec": dec,
                    "flux": obs[keep],
                    "flux_err": flux_err[keep],
                    "mag_inst": mag_inst,
                    "mag_inst_err": 1.0857 / snr[keep],
                    "snr": snr[keep],
                    "flags": pa.array(np.where(sat, 4, 0).astype(np.int32)),
                    "forced": np.zeros(n, dtype=bool),
                    "mjd": np.full(n, e["mjd"]),
                    "filter": [e["filter"]] * n,
                    "truth_id": t.column("object_id").to_numpy()[keep],
                    "truth_kind": np.array(t.column("kind").to_pylist())[keep],
                }
            )
        )
    return pa.concat_tables(pieces)


@pytest.fixture(scope="module")
def survey(tmp_path_factory: pytest.TempPathFactory) -> dict:
    archive = SimArchive.from_config(
        seed=3, naxis1=1024, naxis2=1024, n_fields=1, n_nights=1, visits_per_night=3
    )
    folder = tmp_path_factory.mktemp("sim")
    path = archive.write_catalog(folder / "catalog.parquet")
    exposures = archive.exposures()
    sources = observed_sources(archive, exposures, seed=1)
    catalog = open_catalog(CatalogConfig(path=str(path), columns=COLUMNS))
    matches = match_sources(sources, catalog, radius_arcsec=1.5, bands=BANDS)
    return {"archive": archive, "exposures": exposures, "sources": sources, "matches": matches,
            "catalog": catalog}  # fmt: skip


def test_matches_recover_each_star_and_fit_the_contract(survey: dict) -> None:
    """Truth: every detected catalogue star matches its own entry; appeared ones never do."""
    src, m = survey["sources"], survey["matches"]
    truth = dict(zip(src.column("source_id").to_pylist(), src.column("truth_id").to_pylist(),
                     strict=True))  # fmt: skip
    kind = dict(zip(src.column("source_id").to_pylist(), src.column("truth_kind").to_pylist(),
                    strict=True))  # fmt: skip
    ids = m.column("source_id").to_pylist()
    ref = m.column("ref_id").to_pylist()
    right = sum(truth[s] == r for s, r in zip(ids, ref, strict=True))
    stars = [s for s in src.column("source_id").to_pylist() if kind[s] in ("star", "variable")]
    assert len(stars) > 1000
    assert right >= 0.995 * len(stars)  # completeness of correct matches
    assert right >= 0.995 * len(ids)  # purity
    assert not any(kind[s] == "appeared" for s in ids)
    assert np.all(m.column("match_rank").to_numpy() == 1)
    assert pc.max(m.column("sep_arcsec")).as_py() <= 1.5
    # proper motion applied: separations are at the 0.1" noise level, not the 9-yr drift
    assert np.median(m.column("sep_arcsec").to_numpy()) < 0.2
    # reference magnitude is the survey-band magnitude of the colour model
    objects = survey["archive"].objects()
    assert m.column("ref_mag").null_count == 0
    get_contract("crossmatches").conform(m.drop_columns(["night"]).append_column(
        "_healpix_29", pa.array(np.zeros(m.num_rows, dtype=np.int64))))  # fmt: skip
    assert objects.num_rows > 0
    # the catalogue read was pruned to the exposures' area
    assert survey["catalog"].stats.rows_read > 0


def test_zeropoints_match_the_survey_truth(survey: dict) -> None:
    """Truth: each exposure's MAGZP; issue 5: |ΔZP| <= 0.02 mag with >= 20 stars."""
    cal, phot = calibrate_night(survey["sources"], survey["matches"],
                                CalibrateParams(ref_mag_range=(12.5, 20.0)))  # fmt: skip
    exp = {e["exposure_id"]: e for e in survey["exposures"].to_pylist()}
    assert cal.num_rows == len(exp)
    for row in cal.to_pylist():
        assert row["status"] == "ok" and row["n_used"] >= 20
        truth = exp[row["exposure_id"]]
        assert row["zeropoint_mag"] == pytest.approx(truth["zeropoint_mag"], abs=0.02)
        assert 0 < row["zeropoint_err_mag"] < 0.02
        assert row["mag_system"] == "AB"
        # 5-sigma limit of the simulated 1.5-FWHM aperture on blank sky (sky + read noise);
        # low-S/N sources add a little photon noise, so the limit comes out a bit brighter
        fwhm_pix = truth["seeing_fwhm_arcsec"] / truth["pixscale_arcsec"]
        gain = truth["gain_e_per_adu"]
        sky_var = (
            math.pi
            * (1.5 * fwhm_pix) ** 2
            * (truth["sky_adu"] / gain + (truth["rdnoise_e"] / gain) ** 2)
        )
        expected = truth["zeropoint_mag"] - 2.5 * math.log10(5 * math.sqrt(sky_var))
        assert -0.1 < expected - row["mag_lim"] < 0.15
    # calibrated magnitudes of stars agree with their true magnitudes
    src = survey["sources"]
    err = phot.column("mag").to_numpy() - _true_mags(survey, src)
    bright = src.column("snr").to_numpy() > 50
    assert abs(np.nanmedian(err[bright])) < 0.02
    assert phot.num_rows == src.num_rows
    assert np.all(
        phot.column("mag_err").to_numpy() >= cal.column("zeropoint_err_mag").to_numpy().min()
    )


def _true_mags(survey: dict, src: pa.Table) -> np.ndarray:
    out = np.full(src.num_rows, np.nan)
    for e in survey["exposures"].column("exposure_id").to_pylist():
        t = survey["archive"].truth(e)
        key = dict(zip(t.column("object_id").to_pylist(), t.column("mag").to_pylist(),
                       strict=True))  # fmt: skip
        sel = np.flatnonzero(src.column("exposure_id").to_numpy() == e)
        ids = src.column("truth_id").to_numpy()[sel]
        out[sel] = [key.get(int(i), np.nan) for i in ids]
    return out


def test_too_few_stars_is_reported_not_fatal(survey: dict) -> None:
    """An exposure whose matches are all removed gets status too_few_stars and null mags."""
    src = survey["sources"]
    first = src.column("exposure_id")[0].as_py()
    m = survey["matches"].filter(pc.field("exposure_id") != first)
    cal, phot = calibrate_night(src, m, CalibrateParams())
    row = next(r for r in cal.to_pylist() if r["exposure_id"] == first)
    assert row["status"] == "too_few_stars" and row["zeropoint_mag"] is None
    sel = pc.equal(phot.column("exposure_id"), first)
    assert phot.filter(sel).column("mag").null_count == phot.filter(sel).num_rows


def test_hats_copy_of_the_survey_catalogue_gives_the_same_matches(
    survey: dict, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Issue 5 item 1: the survey's catalogue written as HATS is read (pruned) and
    matched exactly like the Parquet file."""
    from lakepipe.catalogs.hats import write_hats

    root = tmp_path_factory.mktemp("hats") / "refcat"
    write_hats(survey["archive"].catalog(), root, max_rows=2000, row_group_rows=500)
    cat = open_catalog(CatalogConfig(path=str(root), columns=COLUMNS))
    assert type(cat).__name__ == "HatsCatalog"
    m = match_sources(survey["sources"], cat, radius_arcsec=1.5, bands=BANDS)
    ref = survey["matches"]
    assert m.column("source_id").to_pylist() == ref.column("source_id").to_pylist()
    assert m.column("ref_id").to_pylist() == ref.column("ref_id").to_pylist()
    np.testing.assert_allclose(m.column("ref_mag").to_numpy(), ref.column("ref_mag").to_numpy())
    assert cat.stats.files_read >= 1  # (the catalogue only covers the field: all is read)
