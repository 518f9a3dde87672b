"""GPU-only: the cost-model calibration on a real CUDA forward (skipped without a GPU).

On a GPU the per-forward time of a transformer is flat in the token count up to the point
where the matmuls become compute bound, then grows linearly: the fit must find a positive
per-token slope and explain most of the variance over a grid that crosses that point.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_calibration_fits_a_real_cuda_forward():
    from das_sglang.core.cost_model import calibrate

    hidden, layers = 4096, 4
    torch.manual_seed(0)
    weights = [torch.randn(hidden, hidden, device="cuda", dtype=torch.bfloat16) / hidden**0.5
               for _ in range(layers)]

    def forward(n_tokens: int) -> None:
        x = torch.randn(n_tokens, hidden, device="cuda", dtype=torch.bfloat16)
        for w in weights:
            x = torch.nn.functional.gelu(x @ w)
        torch.cuda.synchronize()

    model, samples = calibrate(forward, [64, 512, 2048, 4096, 8192, 16384], repeats=5)
    assert model.c_tok_s > 0 and model.c_base_s >= 0
    assert model.fit_info.r2 > 0.9, model.fit_info
    assert len(samples) == 6
