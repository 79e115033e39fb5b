"""The brain-weighted point sampler: same draws as an index-table reference, the right distribution,
bounded memory, memory-mapped volumes read in place."""
import numpy as np
import pytest
import torch
from scipy import stats

from ifad_fast.sampling import PointSampler, sampler_bytes


class TableSampler:
    """Plain reference: an (N × max focus voxels) table of every focus voxel's linear index."""

    def __init__(self, shape, focus, fraction):
        self.shape, self.fraction = tuple(shape), fraction
        flat = torch.as_tensor(focus).reshape(focus.shape[0], -1) != 0
        self.counts = flat.sum(1)
        self.lists = torch.zeros(flat.shape[0], int(self.counts.max()), dtype=torch.long)
        for i, row in enumerate(flat):
            where = row.nonzero().squeeze(1)
            self.lists[i, : where.numel()] = where

    def draw(self, rows, k, generator):
        b, (sx, sy, sz) = rows.numel(), self.shape
        lin = (torch.rand(b, k, generator=generator, dtype=torch.float64) * (sx * sy * sz)).long()
        n_focus = int(round(self.fraction * k))
        if n_focus:
            pick = (torch.rand(b, n_focus, generator=generator, dtype=torch.float64)
                    * self.counts[rows][:, None]).long()
            lin[:, :n_focus] = self.lists[rows].gather(1, pick)
        idx = torch.stack((lin // (sy * sz), (lin // sz) % sy, lin % sz), dim=-1)
        return idx, lin


@pytest.mark.parametrize("shape,density,fraction", [((9, 10, 11), 0.3, 0.7), ((6, 7, 40), 0.05, 0.8),
                                                    ((5, 4, 33), 0.9, 1.0), ((8, 8, 16), 0.5, 0.25)])
def test_draws_equal_the_index_table_reference(shape, density, fraction):
    gen = torch.Generator().manual_seed(sum(shape))
    focus = (torch.rand(5, *shape, generator=gen) < density).to(torch.uint8) * torch.randint(1, 9, (5, *shape), generator=gen).to(torch.uint8)
    focus[:, 0, 0, 0] = 1                                    # no empty volume
    rows = torch.tensor([3, 1, 4, 0])
    ref = TableSampler(shape, focus, fraction).draw(rows, 301, torch.Generator().manual_seed(5))
    new = PointSampler(shape, focus.numpy(), fraction)
    got = new.draw(rows, 301, torch.Generator().manual_seed(5))
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    # split into parts (one per process), each drawn from the same generator state: the whole draw
    parts = [new.draw(rows, 301, torch.Generator().manual_seed(5), part=slice(a, b))
             for a, b in ((0, 100), (100, 250), (250, 301))]
    assert torch.equal(torch.cat([p[1] for p in parts], 1), ref[1])
    # and the generator advances the same whatever the part
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    new.draw(rows, 301, g1)
    new.draw(rows, 301, g2, part=slice(250, 301))
    assert torch.equal(g1.get_state(), g2.get_state())


def test_focus_draws_fall_inside_at_the_fraction_and_cover_it_uniformly():
    shape = (12, 14, 20)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    r = np.sqrt((g ** 2).sum(0))
    rng = np.random.default_rng(0)
    focus = ((r < 0.8) & (rng.random(shape) > 0.3)).astype(np.uint8)          # a ball with holes
    n_focus, volume = int(focus.sum()), focus.size
    s = PointSampler(shape, focus[None], fraction=0.6)
    k = 200_000
    idx, lin = s.draw(torch.tensor([0]), k, torch.Generator().manual_seed(1))
    assert idx.shape == (1, k, 3) and torch.equal((idx[..., 0] * shape[1] + idx[..., 1]) * shape[2] + idx[..., 2], lin)
    inside = focus.reshape(-1)[lin[0].numpy()] != 0
    n_pick = round(0.6 * k)
    assert inside[:n_pick].all()
    # overall share inside: the fraction plus the uniform points that land inside by chance
    expected = 0.6 + 0.4 * n_focus / volume
    assert abs(inside.mean() - expected) < 4 * np.sqrt(expected * (1 - expected) / k)
    # focus draws: every focus voxel equally likely (chi-square, fixed seed)
    counts = np.bincount(lin[0, :n_pick].numpy(), minlength=volume)[focus.reshape(-1) != 0]
    assert stats.chisquare(counts).pvalue > 1e-3
    assert (np.bincount(lin[0, :n_pick].numpy(), minlength=volume)[focus.reshape(-1) == 0] == 0).all()
    # the uniform rest: every voxel of the grid equally likely
    rest = np.bincount(lin[0, n_pick:].numpy(), minlength=volume)
    assert stats.chisquare(rest).pvalue > 1e-3


def test_memory_is_rows_not_brain_voxels_and_under_1_gb_for_1000_scans_of_160():
    assert sampler_bytes(1000, (160, 160, 160)) < 1e9
    small, big = np.zeros((3, 20, 21, 35), np.uint8), np.zeros((3, 20, 21, 35), np.uint8)
    small[:, 9:11, 9:11, 9:11] = 1
    big[:, 1:-1, 1:-1, 1:-1] = 1
    a, b = PointSampler(small.shape[1:], small, 0.5), PointSampler(big.shape[1:], big, 0.5)
    assert a.nbytes == b.nbytes == sampler_bytes(3, (20, 21, 35))


def test_memory_mapped_focus_is_read_in_place(tmp_path):
    vols = np.zeros((2, 10, 10, 10), np.uint8)
    vols[:, 2:8, 3:7, 1:9] = 2
    np.save(tmp_path / "v.npy", vols)
    mapped = np.load(tmp_path / "v.npy", mmap_mode="r")
    s = PointSampler(vols.shape[1:], mapped, 1.0)
    assert s.flat.data_ptr() == mapped.ctypes.data                    # no copy of the volumes
    _, lin = s.draw(torch.tensor([1, 0]), 500, torch.Generator().manual_seed(0))
    assert (vols.reshape(2, -1)[[[1], [0]], lin.numpy()] == 2).all()


def test_no_focus_or_an_empty_volume_draws_uniformly():
    focus = np.zeros((2, 5, 6, 7), np.uint8)
    focus[0, 1, 1, 1] = 1                                             # volume 1 has no focus voxel
    for s in (PointSampler((5, 6, 7)), PointSampler((5, 6, 7), focus, 0.5)):
        assert s.fraction == 0.0
        idx, lin = s.draw(torch.tensor([0, 1]), 50, torch.Generator().manual_seed(0))
        assert idx.shape == (2, 50, 3) and (lin >= 0).all() and (lin < 5 * 6 * 7).all()
