"""QuPath-named nucleus measurements (cellseg.measurements) against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from shapely import affinity
from shapely.geometry import Point, box

from cellseg.geojson import mask_polygon
from cellseg.measurements import (
    HE_STAINS,
    calipers,
    shape_measurements,
    stain_amounts,
    stain_measurements,
)


def test_a_disc_of_known_radius():
    """A 10 µm radius disc (a 1024-gon), 0.5 µm per pixel."""
    disc = Point(100, 100).buffer(20, quad_segs=256)
    (m,) = shape_measurements([disc], level0_mpp=0.5)
    assert m["Nucleus: Area µm^2"] == pytest.approx(math.pi * 10**2, rel=1e-4)
    assert m["Nucleus: Perimeter µm"] == pytest.approx(2 * math.pi * 10, rel=1e-4)
    assert m["Nucleus: Circularity"] == pytest.approx(1.0, abs=1e-4)
    assert m["Nucleus: Solidity"] == pytest.approx(1.0, abs=1e-9)
    assert m["Nucleus: Max caliper µm"] == pytest.approx(20.0, rel=1e-4)
    assert m["Nucleus: Min caliper µm"] == pytest.approx(20.0, rel=1e-4)
    assert m["Nucleus: Eccentricity"] == pytest.approx(0.0, abs=1e-3)


def test_a_rasterised_disc_is_nearly_round():
    yy, xx = np.mgrid[:61, :61]
    outline = mask_polygon((yy - 30) ** 2 + (xx - 30) ** 2 <= 25**2, (0, 0), 1.0)
    (m,) = shape_measurements([outline], level0_mpp=1.0)
    assert m["Nucleus: Area µm^2"] == pytest.approx(math.pi * 25**2, rel=0.01)
    assert 0.85 < m["Nucleus: Circularity"] < 1.0  # pixel steps lengthen the outline
    assert m["Nucleus: Eccentricity"] < 0.05


def test_a_rotated_rectangle_calipers_and_eccentricity():
    """A 30×40 px rectangle turned by 30° and far from the origin (level-0 offsets)."""
    rectangle = affinity.rotate(box(50_000, 80_000, 50_030, 80_040), 30, origin="centroid")
    (m,) = shape_measurements([rectangle], level0_mpp=0.25, compartment="Cell")
    assert m["Cell: Area µm^2"] == pytest.approx(1200 / 16)
    assert m["Cell: Perimeter µm"] == pytest.approx(140 / 4)
    assert m["Cell: Max caliper µm"] == pytest.approx(50 / 4)  # the diagonal
    assert m["Cell: Min caliper µm"] == pytest.approx(30 / 4)  # the short side
    assert m["Cell: Circularity"] == pytest.approx(4 * math.pi * 1200 / 140**2)
    # Second moments of a w×h rectangle: w²/12 and h²/12.
    assert m["Cell: Eccentricity"] == pytest.approx(math.sqrt(1 - 30**2 / 40**2))
    assert m["Cell: Solidity"] == pytest.approx(1.0)


def test_an_l_shape_solidity_and_calipers():
    l_shape = box(0, 0, 20, 10).union(box(0, 0, 10, 20))
    (m,) = shape_measurements([l_shape], level0_mpp=1.0)
    assert m["Nucleus: Solidity"] == pytest.approx(300 / 350)  # the hull adds a 50 px² triangle
    assert m["Nucleus: Max caliper µm"] == pytest.approx(math.hypot(20, 20))
    assert calipers(np.array([[0, 0], [20, 0], [20, 10], [0, 10]], float)) == pytest.approx(
        (math.hypot(20, 10), 10)
    )


def test_a_flat_coloured_patch_has_the_optical_density_it_was_made_with():
    """Pixels made from 0.6 hematoxylin + 0.2 eosin OD by the Beer-Lambert law."""
    od_rgb = 0.6 * HE_STAINS[0] + 0.2 * HE_STAINS[1]
    colour = np.rint(255 * 10 ** (-od_rgb)).astype(np.uint8)
    rgb = np.broadcast_to(colour, (12, 12, 3)).copy()
    labels = np.zeros((12, 12), np.int32)
    labels[2:9, 3:10] = 7
    labels[0, :] = 2
    rgb[0, :6] = 255  # half of nucleus 2 is white: 0 OD there
    (m7, m2) = stain_measurements(labels, rgb, [7, 2])
    h, e = stain_amounts(colour[None])[0]
    assert h == pytest.approx(0.6, abs=0.01) and e == pytest.approx(0.2, abs=0.01)
    assert m7["Nucleus: Hematoxylin OD mean"] == pytest.approx(h)
    assert m7["Nucleus: Hematoxylin OD std dev"] == pytest.approx(0.0, abs=1e-12)
    assert m7["Nucleus: Eosin OD max"] == pytest.approx(e)
    assert m2["Nucleus: Hematoxylin OD mean"] == pytest.approx(h / 2)
    assert m2["Nucleus: Hematoxylin OD std dev"] == pytest.approx(h / 2)
    assert m2["Nucleus: Hematoxylin OD min"] == pytest.approx(0.0, abs=1e-12)
    assert m2["Nucleus: Hematoxylin OD max"] == pytest.approx(h)
    assert stain_measurements(labels, rgb, []) == []


def test_white_has_no_stain_and_the_stain_vectors_are_qupaths():
    assert np.allclose(stain_amounts(np.full((1, 3), 255, np.uint8)), 0.0)
    assert np.allclose(HE_STAINS[2], [0.316, -0.598, 0.737], atol=2e-3)  # QuPath's residual
