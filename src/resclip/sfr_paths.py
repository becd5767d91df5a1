"""SFR's valid paths ``V`` (paper Eq. 9) in the form the engine runs: every patch pair at once.

``V[i, j]`` says whether patches ``i`` and ``j`` are joined by a path of patches that all carry
their label. The released code checks the straight line between them (``path="line"``): the
line tables below list, per pair, the grid cells a rounded straight line visits, built once per
grid size from two per-axis tables in int16 and cached. The paper's reading is a connected
same-label region (``path="connected"``). :func:`resclip.sfr.valid_paths_reference` is the plain
one-row form the tests compare these with.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=16)
def _line_axis(n: int, mx: int) -> torch.Tensor:
    """``(n, n, mx+1)`` int64: ``round(a * (1 - t_k) + b * t_k)`` for grid coordinates ``a, b < n``.

    ``t = linspace(0, 1, mx + 1)`` in float32, half-to-even rounding (the released sampling).
    """
    t = torch.linspace(0, 1, mx + 1, dtype=torch.float32)
    a = torch.arange(n, dtype=torch.float32)
    return torch.round(a[:, None, None] * (1 - t) + a[None, :, None] * t).long()


def _line_rows(h: int, w: int, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of the ``(N, N, Mx+1)`` int64 table of the patches sampled on each
    segment i -> j (:func:`valid_paths_reference`); samples past ``d(i, j)`` repeat ``i``, so they
    never fail the check. Rows and columns are sampled apart from two small per-axis tables."""
    mx = max(h, w) - 1
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    qi = torch.arange(start, stop)
    pr = _line_axis(h, mx)[rows[qi]][:, rows]  # (c, N, K)
    pc = _line_axis(w, mx)[cols[qi]][:, cols]
    steps = torch.maximum((rows[qi, None] - rows).abs(), (cols[qi, None] - cols).abs())
    beyond = torch.arange(mx + 1) > steps[:, :, None]
    return torch.where(beyond, qi[:, None, None], pr * w + pc)


def _rows_per_block(n: int, k: int) -> int:
    return max(1, (1 << 19) // max(1, n * k))  # int64 blocks of at most 4 MiB


@functools.lru_cache(maxsize=4)
def _line_table_on(h: int, w: int, device: torch.device) -> torch.Tensor:
    return _line_table(h, w).to(device)  # one copy per device, none on CPU


@functools.lru_cache(maxsize=4)
def _line_table(h: int, w: int) -> torch.Tensor:
    """The ``(N, N, Mx+1)`` table of :func:`_line_rows` in int16 (int32 from 32768 patches). A few
    grid sizes are kept: sliding windows and most benchmark images share a handful of sizes."""
    n, k = h * w, max(h, w)
    table = torch.empty(n, n, k, dtype=torch.int16 if n < 2**15 else torch.int32)
    step = _rows_per_block(n, k)
    for start in range(0, n, step):
        table[start : start + step] = _line_rows(h, w, start, min(n, start + step))
    return table


def valid_path_line(labels: torch.Tensor) -> torch.Tensor:
    """``(B, N, N)`` bool (row = query patch i): every sampled point of the segment i -> j has i's
    label (the released check) for ``(B, h, w)`` int64 labels.

    Trick: one cached table of sample indices per grid size turns the check into a gather and an
    ``all`` over the samples, a block of rows at a time (int64 index blocks of at most 4 MiB).
    """
    b, h, w = labels.shape
    n, k = h * w, max(h, w)
    table = _line_table_on(h, w, labels.device)
    flat = labels.reshape(b, n)
    out = torch.empty(b, n, n, dtype=torch.bool, device=labels.device)
    same = flat[:, :, None] == flat[:, None, :]  # (B, N, N): same[., i, m] = M(m) == M(i)
    step = _rows_per_block(n, k)
    for start in range(0, n, step):
        stop = min(n, start + step)
        idx = table[start:stop].reshape(stop - start, -1).long()
        for bi in range(b):
            ok = same[bi, start:stop].gather(1, idx).view(stop - start, n, k)
            out[bi, start:stop] = ok.all(dim=-1)
    return out


def connected_components(labels: torch.Tensor, connectivity: int = 8) -> torch.Tensor:
    """``(B, h, w)`` int64 ids of the connected same-label regions (4- or 8-connected) of ``(B, h, w)``
    labels: the smallest flat index in each region, spread by repeated neighbour minima."""
    b, h, w = labels.shape
    big = h * w
    comp = torch.arange(h * w, device=labels.device).view(1, h, w).expand(b, h, w).clone()
    offsets = [(0, 1), (1, 0), (0, -1), (-1, 0)]
    if connectivity == 8:
        offsets += [(1, 1), (1, -1), (-1, 1), (-1, -1)]
    pad_lab = F.pad(labels, (1, 1, 1, 1), value=-1)
    while True:
        pad_comp = F.pad(comp, (1, 1, 1, 1), value=big)
        new = comp
        for dy, dx in offsets:
            nb_lab = pad_lab[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
            nb_comp = pad_comp[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
            new = torch.where(nb_lab == labels, torch.minimum(new, nb_comp), new)
        if torch.equal(new, comp):
            return comp
        comp = new


def valid_path_connected(labels: torch.Tensor, connectivity: int = 8) -> torch.Tensor:
    """``(B, N, N)`` bool: i and j lie in one connected same-label region (the paper's path)."""
    comp = connected_components(labels, connectivity).flatten(1)
    return comp[:, :, None] == comp[:, None, :]
