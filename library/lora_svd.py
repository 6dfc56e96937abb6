"""SVD maths for the LoRA tools: exact SVD of factored products, rank choice, clamping.

A LoRA module's weight change is ΔW = up·down·scale, with up [out, r] and down [r, in·k·k].
Products of factors (one LoRA, or several LoRAs concatenated along the rank) are decomposed
without forming the out×in matrix: QR of each factor, then the SVD of the small r×r core.
This is exact (same singular values and subspaces as a full SVD of the product) and costs
O((out + in)·r²) instead of O(out·in·min(out, in)). Full-rank matrices (the difference of two
models) go through `torch.linalg.svd` on the chosen device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from library.errors import UserError

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
#: singular values at or below this are treated as zero (an all-zero module keeps rank 1)
ZERO_SINGULAR_VALUE = 1e-6


@dataclass
class Decomposition:
    """ΔW ≈ u · diag(s) · vh, singular values in descending order."""

    u: torch.Tensor  # [out, k]
    s: torch.Tensor  # [k]
    vh: torch.Tensor  # [k, in]

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) of the best rank-`rank` approximation: up = U·S, down = Vh (Eckart–Young)."""
        return self.u[:, :rank] * self.s[:rank], self.vh[:rank]

    def kept_fro_fraction(self, rank: int) -> float:
        """‖best rank-r approximation‖_F / ‖ΔW‖_F (1.0 for an all-zero matrix)."""
        total = float((self.s**2).sum())
        if total <= 0:
            return 1.0
        return (float((self.s[:rank] ** 2).sum()) / total) ** 0.5


def svd_of_product(up: torch.Tensor, down: torch.Tensor) -> Decomposition:
    """Exact thin SVD of `up @ down` (up [out, r], down [r, in]) through QR of both factors."""
    up = up.float()
    down = down.float()
    q_up, r_up = torch.linalg.qr(up)  # up = Qu·Ru
    q_down, r_down = torch.linalg.qr(down.T)  # downᵀ = Qd·Rd
    core_u, s, core_vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    return Decomposition(q_up @ core_u, s, core_vh @ q_down.T)


def svd_of_matrix(matrix: torch.Tensor, device: Optional[torch.device | str] = None) -> Decomposition:
    """Thin SVD of a full matrix (on `device`, results on the CPU in float32)."""
    on_device = matrix.to(device=device or matrix.device, dtype=torch.float32)
    if on_device.ndim == 2 and on_device.shape[0] < on_device.shape[1]:
        # the same decomposition through the tall transpose: LAPACK's divide-and-conquer SVD is
        # 5-8x slower on a wide matrix (e.g. a 1280 x 23040 conv difference) than on its transpose
        v, s, uh = torch.linalg.svd(on_device.T, full_matrices=False)
        u, vh = uh.T, v.T
    else:
        u, s, vh = torch.linalg.svd(on_device, full_matrices=False)
    return Decomposition(u.cpu().contiguous(), s.cpu(), vh.cpu().contiguous())


def dynamic_rank(s: torch.Tensor, method: Optional[str], param: Optional[float], max_rank: int) -> int:
    """The rank to keep: `max_rank`, or what a `--dynamic_method` picks, capped at `max_rank`.

    sv_ratio keeps singular values greater than S[0]/param; sv_cumulative keeps the fewest
    values whose sum reaches `param` of the total; sv_fro the fewest whose squared sum reaches
    `param²` of the total (so ‖kept‖_F / ‖ΔW‖_F >= param). At least one value is kept.
    """
    count = int(s.numel())
    if count == 0:
        return 0
    if method is None:
        rank = max_rank
    elif float(s[0]) <= ZERO_SINGULAR_VALUE:
        rank = 1
    elif method == "sv_ratio":
        rank = int((s > s[0] / param).sum())
    elif method == "sv_cumulative":
        rank = _first_reaching(torch.cumsum(s, 0) / s.sum(), param)
    elif method == "sv_fro":
        rank = _first_reaching(torch.cumsum(s**2, 0) / (s**2).sum(), param**2)
    else:
        raise UserError(f"--dynamic_method {method!r}: expected one of {', '.join(DYNAMIC_METHODS)}")
    return max(1, min(rank, max_rank, count))


def _first_reaching(fractions: torch.Tensor, target: float) -> int:
    # float rounding can leave the last cumulative fraction a hair under 1.0
    reached = fractions >= target - 1e-6
    return int(reached.nonzero()[0]) + 1 if bool(reached.any()) else int(fractions.numel())


def check_dynamic_args(method: Optional[str], param: Optional[float]) -> None:
    """--dynamic_method needs --dynamic_param in its range (sv_ratio > 1 is meaningful; >= 1 allowed)."""
    if method is None:
        return
    if method not in DYNAMIC_METHODS:
        raise UserError(f"--dynamic_method {method!r}: expected one of {', '.join(DYNAMIC_METHODS)}")
    if param is None:
        raise UserError(f"--dynamic_method {method} needs --dynamic_param")
    if method == "sv_ratio" and param < 1:
        raise UserError(f"--dynamic_param for sv_ratio is a ratio S[0]/S[i] >= 1, got {param}")
    if method in ("sv_fro", "sv_cumulative") and not 0 < param <= 1:
        raise UserError(f"--dynamic_param for {method} is a fraction in (0, 1], got {param}")


def clamp_factors(up: torch.Tensor, down: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp both factors to ±(the `quantile` of |values| over both), as sd-scripts' extract does
    (cuts outliers that fp16 files and other loaders handle badly). quantile 1 keeps everything."""
    if quantile >= 1.0:
        return up, down
    values = torch.cat([up.flatten(), down.flatten()]).abs()
    if values.numel() > 16_000_000:  # torch.quantile's input limit: estimate from a strided sample
        values = values[:: values.numel() // 16_000_000 + 1]
    limit = float(torch.quantile(values, quantile))
    return up.clamp(-limit, limit), down.clamp(-limit, limit)


def max_rank_of(out_features: int, in_features: int) -> int:
    """The largest rank a LoRA of an out × in (flattened) layer can have."""
    return min(out_features, in_features)


def check_device(device: Optional[str]) -> Optional[str]:
    """--device: None (CPU) or a torch device that exists here."""
    if device is None:
        return None
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        raise UserError(f"--device {device}: not usable here ({str(err).splitlines()[0]})") from None
    return device
