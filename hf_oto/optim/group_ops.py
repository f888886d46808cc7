"""Per-group views, norms and budgets of the penalised parameters, shared by HSPG's paper and target modes.

A member of a zero-invariant family is split along one `dim` into `num_groups` equal slices, one per group. The
helpers here give a tensor an explicit group axis (`grouped`), broadcast a `[num_groups]` vector against such a view
(`per_group`), compute the per-group squared norms (`squared_norms`), cut a member into blocks of whole groups for the
fused update (`Blocks`), and turn a sparsity fraction into a number of groups (`sparsity_budget`). Reductions are
accumulated in float32 at least (`at_least_float32`), whatever the parameter's dtype.
"""

from __future__ import annotations

import math

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself if it is float32 or float64, else a float32 copy (for sums of float16 / bfloat16 values).

    Example:

    ```python
    >>> import torch
    >>> from hf_oto.optim.group_ops import at_least_float32

    >>> at_least_float32(torch.ones(2, dtype=torch.bfloat16)).dtype
    torch.float32
    ```
    """
    if tensor.dtype in (torch.float32, torch.float64):
        return tensor
    return tensor.float()


def grouped(tensor: torch.Tensor, dim: int, num_groups: int) -> torch.Tensor:
    """A view of `tensor` whose group axis is explicit: `[num_groups, -1]` for a contiguous `dim == 0`, else
    `tensor` unflattened at `dim` into `(num_groups, -1)`.

    Example:

    ```python
    >>> import torch
    >>> from hf_oto.optim.group_ops import grouped

    >>> grouped(torch.zeros(6, 4), dim=0, num_groups=3).shape, grouped(torch.zeros(6, 4), dim=1, num_groups=2).shape
    (torch.Size([3, 8]), torch.Size([6, 2, 2]))
    ```
    """
    if dim == 0 and tensor.is_contiguous():
        return tensor.view(num_groups, -1)
    return tensor.unflatten(dim, (num_groups, -1))


def per_group(values: torch.Tensor, view: torch.Tensor, dim: int) -> torch.Tensor:
    """`values` (`[num_groups]`) shaped to broadcast against `view = grouped(tensor, dim, num_groups)`.

    Example:

    ```python
    >>> import torch
    >>> from hf_oto.optim.group_ops import grouped, per_group

    >>> view = grouped(torch.ones(6, 4), dim=1, num_groups=2)
    >>> (view * per_group(torch.tensor([0.0, 2.0]), view, dim=1)).sum(dim=(0, 2))
    tensor([ 0., 24.])
    ```
    """
    if dim == 0 and view.dim() == 2:
        return values.view(-1, 1)
    shape = [1] * view.dim()
    shape[dim] = values.numel()
    return values.view(shape)


def squared_norms(tensor: torch.Tensor, dim: int, num_groups: int, *, sum_of_squares: bool = False) -> torch.Tensor:
    """`[num_groups]` tensor of the squared group norms `||a_g||^2` of `tensor`, in float32 at least.

    On the row layout (contiguous, `dim == 0`) they are the squares of one fused `vector_norm` per row, the quantity
    HSPG's step tests and penalises; elsewhere, and with `sum_of_squares=True` on every layout, the sums of the squares
    over each group (the target mode's ramp radii are measured that way). The two agree to rounding.

    Example:

    ```python
    >>> import torch
    >>> from hf_oto.optim.group_ops import squared_norms

    >>> squared_norms(torch.tensor([[3.0, 4.0], [0.0, 0.0]]), dim=0, num_groups=2)
    tensor([25.,  0.])
    ```
    """
    if not sum_of_squares and dim == 0 and tensor.is_contiguous():
        return torch.linalg.vector_norm(at_least_float32(tensor.view(num_groups, -1)), dim=1).square()
    view = at_least_float32(tensor.unflatten(dim, (num_groups, -1)))
    return view.square().sum(dim=[d for d in range(view.dim()) if d != dim])


def sparsity_budget(fraction: float, num_groups: int) -> int:
    """How many of `num_groups` groups a sparsity bound of `fraction` lets HSPG zero (rounded down).

    Example:

    ```python
    >>> from hf_oto.optim.group_ops import sparsity_budget

    >>> sparsity_budget(0.9, 12), sparsity_budget(0.5, 12)
    (10, 6)
    ```
    """
    return math.floor(fraction * num_groups + 1e-9)


class Blocks:
    """The blocks of whole groups in which one penalised parameter is updated, and views of its tensors by block.

    For `dim == 0` on a contiguous parameter (every member `build_zigs` produces) a block is a range of rows of the
    `[num_groups, -1]` view holding at most `elements` elements per intra-op thread (at least one group); otherwise
    (e.g. `channels_last`) the whole grouped tensor is one block. The parameter, its gradient and its optimizer state
    share one layout, so `view` cuts any of them.

    Args:
        param (`torch.Tensor`):
            The penalised parameter.
        dim (`int`):
            The axis along which it is split into groups.
        num_groups (`int`):
            The number of groups.
        elements (`int`):
            Elements per block and per intra-op thread.

    Example:

    ```python
    >>> import torch
    >>> from hf_oto.optim.group_ops import Blocks

    >>> torch.set_num_threads(1)
    >>> blocks = Blocks(torch.zeros(10, 4), dim=0, num_groups=10, elements=16)
    >>> blocks.ranges
    [(0, 4), (4, 8), (8, 10)]
    >>> blocks.view(torch.arange(40.0).view(10, 4), blocks.ranges[2]).shape
    torch.Size([2, 4])
    ```
    """

    def __init__(self, param: torch.Tensor, dim: int, num_groups: int, elements: int):
        self.dim, self.num_groups = dim, num_groups
        self.flat = dim == 0 and param.is_contiguous()  # channels_last: the unflattened path
        if self.flat:
            block = elements * max(1, torch.get_num_threads())
            rows = max(1, block // max(1, param.numel() // max(1, num_groups)))
            self.ranges = [(start, min(start + rows, num_groups)) for start in range(0, num_groups, rows)]
        else:
            self.ranges = [(0, num_groups)]

    def view(self, tensor: torch.Tensor, rows: tuple[int, int]) -> torch.Tensor:
        """The block `rows` of `tensor` (the whole grouped tensor on the unflattened path)."""
        if self.flat:
            return tensor.view(self.num_groups, -1)[rows[0] : rows[1]]
        return tensor.unflatten(self.dim, (self.num_groups, -1))

    def per_group(self, values: torch.Tensor, rows: tuple[int, int], view: torch.Tensor) -> torch.Tensor:
        """`values` (`[num_groups]`) restricted to the block `rows`, shaped to broadcast against its `view`."""
        if self.flat:
            return values[rows[0] : rows[1]].unsqueeze(1)
        return per_group(values, view, self.dim)

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The per-group dot products `a_g^T b_g` of two block views, accumulated in float32 at least."""
        if a.dtype not in (torch.float32, torch.float64):
            a, b = a.float(), b.float()
        if self.flat:
            return torch.linalg.vecdot(a, b)
        return (a * b).sum(dim=[d for d in range(a.dim()) if d != self.dim])
