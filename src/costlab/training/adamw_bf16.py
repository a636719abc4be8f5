"""AdamW with bf16 states (``optimizer=adamw_bf16``): torchao's AdamW update, computed in fp32, with both
states stored in bf16. No library ships it as a class; torchao's low-bit AdamWs are the same update with
other state tensors, so this is one of them with plain bf16 tensors as its states. Needs torchao (the quant
extra): this module is imported only by the option that names it."""

from __future__ import annotations

import torch
from torch import Tensor
from torchao.optim.adam import _AdamBase


class AdamWBf16(_AdamBase):
    def __init__(
        self,
        params: object,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        bf16_stochastic_round: bool = False,
    ) -> None:
        # block_size 1: every tensor of at least 4096 values (torchao's threshold) gets bf16 states
        super().__init__(params, lr, betas, eps, weight_decay, False, block_size=1,
                         bf16_stochastic_round=bf16_stochastic_round, is_adamw=True)

    @staticmethod
    def _subclass_zeros(p: Tensor, signed: bool, block_size: int) -> Tensor:
        return torch.zeros(p.shape, dtype=torch.bfloat16, device=p.device)
