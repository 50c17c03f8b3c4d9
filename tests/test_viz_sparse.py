"""Lab 06's sparse-mask figures, checked on their data."""

from __future__ import annotations

import pytest
import torch

from lablib.viz import sparse as vs

DENSITIES = [1.0, 0.5, 0.25]
CURVES = {"magnitude": [2.0, 2.2, 2.9], "random": [2.0, 3.1, 3.6]}


def test_density_figure_one_line_per_method_and_the_slider_density_in_the_legend():
    fig = vs.density_figure(DENSITIES, CURVES, density=0.5, dense_loss=2.0)
    assert [t.name for t in fig.data] == ["magnitude: 2.200", "random: 3.100"]
    assert list(fig.data[1].y) == [2.0, 3.1, 3.6] and list(fig.data[0].x) == DENSITIES
    assert [s.x0 for s in fig.layout.shapes if s.type == "line" and s.x0 == s.x1] == [0.5]
    assert fig.layout.xaxis.autorange == "reversed"
    assert [t.name for t in vs.density_figure(DENSITIES, CURVES).data] == ["magnitude", "random"]


def test_density_figure_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one curve"):
        vs.density_figure(DENSITIES, {})
    with pytest.raises(ValueError, match="2 losses for 3 densities"):
        vs.density_figure(DENSITIES, {"m": [1, 2]})
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        vs.density_figure([1.5, 0.5, 0.2], CURVES)
    with pytest.raises(ValueError, match="not one of the swept"):
        vs.density_figure(DENSITIES, CURVES, density=0.3)


def test_mask_images_crop_each_mask_and_title_it_with_its_full_density():
    masks = {"a": torch.ones(4, 8, dtype=torch.bool), "b": torch.tensor([[1, 0, 0, 0]] * 2, dtype=torch.bool)}
    fig = vs.mask_images_figure(masks, columns=2, max_rows=3, max_cols=2)
    assert [t.name for t in fig.data] == ["a", "b"]
    assert len(fig.data[0].z) == 3 and len(fig.data[0].z[0]) == 2  # the corner only
    assert [a.text for a in fig.layout.annotations] == ["a (100%)", "b (25%)"]  # density of the whole tensor
    with pytest.raises(ValueError, match="at least one mask"):
        vs.mask_images_figure({})
    with pytest.raises(ValueError, match="2-D"):
        vs.mask_images_figure({"v": [1, 0, 1]})


def test_nm_zoom_blanks_pruned_entries_and_draws_group_boundaries():
    weight = torch.tensor([[0.5, -0.1, 0.2, -0.7, 1.0, 0.0, 0.3, 0.1]])
    mask = torch.tensor([[1, 0, 0, 1, 1, 0, 1, 0]], dtype=torch.bool)
    fig = vs.nm_zoom_figure(weight, mask, m=4)
    assert list(fig.data[0].z[0]) == [0.5, None, None, pytest.approx(-0.7), 1.0, None, pytest.approx(0.3), None]
    assert list(fig.data[0].text[0]) == ["+0.50", "", "", "-0.70", "+1.00", "", "+0.30", ""]
    assert [s.x0 for s in fig.layout.shapes] == [3.5]
    with pytest.raises(ValueError, match="groups of m=3"):
        vs.nm_zoom_figure(weight, mask, m=3)
    with pytest.raises(ValueError, match="1x8 but mask is 1x4"):
        vs.nm_zoom_figure(weight, mask[:, :4])


def test_seed_bars_mean_per_method_and_one_dot_per_seed():
    fig = vs.seed_bars_figure({"x": [1.0, 3.0], "y": [2.0, 2.0]}, seeds=[4, 5], reference={"dense": 1.5})
    assert list(fig.data[0].y) == [2.0, 2.0] and list(fig.data[0].x) == ["x", "y"]
    assert list(fig.data[1].y) == [1.0, 3.0, 2.0, 2.0] and list(fig.data[1].text) == ["seed 4", "seed 5"] * 2
    assert fig.layout.shapes[0].y0 == 1.5
    with pytest.raises(ValueError, match="same non-zero number"):
        vs.seed_bars_figure({"x": [1.0], "y": [1.0, 2.0]})
    with pytest.raises(ValueError, match="1 seeds given for 2"):
        vs.seed_bars_figure({"x": [1.0, 2.0]}, seeds=[0])


def test_graft_figure_lines_per_seed_on_a_log_axis():
    fig = vs.graft_figure([0.001, 0.01, 1.0], {"seed 0": [0.1, 0.6, 1.0]}, fraction=0.01)
    assert fig.data[0].name == "seed 0" and list(fig.data[0].y) == [0.1, 0.6, 1.0]
    assert fig.layout.xaxis.type == "log"
    assert 0.01 in [s.x0 for s in fig.layout.shapes]
    with pytest.raises(ValueError, match="> 0"):
        vs.graft_figure([0.0, 1.0], {"s": [0, 1]})
    with pytest.raises(ValueError, match="1 values for 2"):
        vs.graft_figure([0.1, 1.0], {"s": [0]})
