"""CostModel: worked numbers, least-squares fit, presets, calibration."""

import numpy as np
import pytest

from das_sglang.core.cost_model import PRESETS, CostModel, calibrate, roofline


class TestForwardTime:
    def test_worked_number(self):
        m = CostModel(c_base_s=0.010, c_tok_s=0.001, c_kv_s=1e-6)
        # 10 ms + 10 tokens * 1 ms + 1000 KV tokens * 1 us = 21 ms
        assert m.forward_time(10, 1000) == pytest.approx(0.021)
        assert m.forward_time(10) == pytest.approx(0.020)

    def test_vectorised(self):
        m = CostModel(0.01, 0.001)
        np.testing.assert_allclose(m.forward_time(np.array([0, 1, 2])), [0.010, 0.011, 0.012])

    @pytest.mark.parametrize("field", ["c_base_s", "c_tok_s", "c_kv_s"])
    def test_rejects_negative_and_nan(self, field):
        for bad in (-1.0, float("nan")):
            kwargs = {"c_base_s": 0.0, "c_tok_s": 0.0, field: bad}
            with pytest.raises(ValueError, match=field):
                CostModel(**kwargs)


class TestFit:
    def test_recovers_exact_constants(self):
        truth = CostModel(0.0065, 2.5e-5, 2e-8)
        samples = [(n, kv, truth.forward_time(n, kv)) for n in (1, 64, 256, 1024) for kv in (0, 10**5, 10**6)]
        fit = CostModel.fit(samples)
        assert fit.c_base_s == pytest.approx(truth.c_base_s, rel=1e-9)
        assert fit.c_tok_s == pytest.approx(truth.c_tok_s, rel=1e-9)
        assert fit.c_kv_s == pytest.approx(truth.c_kv_s, rel=1e-9)
        assert fit.fit_info.rmse_s < 1e-12 and fit.fit_info.r2 == pytest.approx(1.0)

    def test_recovers_noisy_constants_and_reports_error(self):
        rng = np.random.default_rng(0)
        n = np.repeat(np.arange(1, 2049, 64), 5)
        t = 0.006 + 3e-5 * n
        noisy = t * (1 + 0.02 * rng.standard_normal(len(n)))
        fit = CostModel.fit(zip(n, noisy))
        assert fit.c_base_s == pytest.approx(0.006, rel=0.05)
        assert fit.c_tok_s == pytest.approx(3e-5, rel=0.03)
        assert fit.c_kv_s == 0.0
        assert 0.005 < fit.fit_info.mean_rel_err < 0.04  # the 2% noise shows up in the report
        assert fit.fit_info.n_samples == len(n)

    def test_constants_stay_non_negative(self):
        # Times that fall with n would give a negative slope; NNLS clamps it to 0.
        fit = CostModel.fit([(1, 0.010), (100, 0.009), (200, 0.008)])
        assert fit.c_tok_s == 0.0
        assert fit.c_base_s == pytest.approx(0.009)

    @pytest.mark.parametrize(
        "samples, message",
        [
            ([(1, 0.1)], "at least 2 samples"),
            ([(1, 0.1), (2, 3, 0.2)], "row lengths"),
            ([(1, 0.1), (2, -0.2)], "negative or not finite"),
            ([(5, 0.1), (5, 0.2)], "two distinct n_tokens"),
        ],
    )
    def test_bad_samples(self, samples, message):
        with pytest.raises(ValueError, match=message):
            CostModel.fit(samples)


class TestPresets:
    def test_h100_7b_roofline_arithmetic(self):
        m = CostModel.preset("h100-7b")
        # 7.62e9 params * 2 B / (3.35e12 B/s * 0.8) + 1 ms overhead
        assert m.c_base_s == pytest.approx(7.62e9 * 2 / (3.35e12 * 0.8) + 1e-3)
        # 2 FLOPs/param/token over 60% of 989 TFLOP/s
        assert m.c_tok_s == pytest.approx(2 * 7.62e9 / (989e12 * 0.6))
        # K and V of 28 layers x 4 KV heads x 128 dims x 2 B per context token
        assert m.c_kv_s == pytest.approx(2 * 28 * 4 * 128 * 2 / (3.35e12 * 0.8))

    def test_orderings(self):
        for model in ("7b", "8b", "32b"):
            assert PRESETS[f"h200-{model}"].c_base_s < PRESETS[f"h100-{model}"].c_base_s < PRESETS[f"a100-{model}"].c_base_s
        assert PRESETS["h100-32b"].c_tok_s > PRESETS["h100-7b"].c_tok_s
        # the ratio that sets how many drafts pay off: hundreds of tokens per c_base
        ratio = PRESETS["h100-7b"].c_base_s / PRESETS["h100-7b"].c_tok_s
        assert 100 < ratio < 1000

    def test_cpu_tiny_exists_and_unknown_preset_is_named(self):
        assert CostModel.preset("cpu-tiny").name == "cpu-tiny"
        with pytest.raises(ValueError, match="'b200-7b'"):
            CostModel.preset("b200-7b")
        with pytest.raises(ValueError, match="tpu"):
            roofline("tpu", "7b")


class TestCalibrate:
    def test_fake_clock_recovers_constants(self):
        clock = [0.0]

        def forward(n, kv):
            clock[0] += 0.002 + 1e-5 * n + 1e-8 * kv

        model, samples = calibrate(forward, [1, 8, 64, 512], kv_grid=[0, 10000], repeats=3,
                                   warmup=1, timer=lambda: clock[0])
        assert len(samples) == 8
        assert model.c_base_s == pytest.approx(0.002)
        assert model.c_tok_s == pytest.approx(1e-5)
        assert model.c_kv_s == pytest.approx(1e-8)
        assert model.fit_info.max_rel_err < 1e-9

    def test_explicit_pairs(self):
        clock = [0.0]

        def forward(n, kv):
            clock[0] += 0.001 + 2e-5 * n + 1e-7 * kv

        pairs = [(b * (1 + w), b * 256) for b in (1, 4, 16) for w in (0, 3, 7)]
        model, samples = calibrate(forward, pairs, repeats=1, warmup=0, timer=lambda: clock[0])
        assert [s[:2] for s in samples] == [tuple(map(float, p)) for p in pairs]
        assert model.c_kv_s == pytest.approx(1e-7)

    def test_bad_repeats(self):
        with pytest.raises(ValueError, match="repeats=0"):
            calibrate(lambda n: None, [1, 2], repeats=0)


class TestRaggedVerifyCost:
    """Ragged verification: the forward is charged its total tokens, not bs x max width."""

    def test_verify_tokens_ragged_vs_uniform(self):
        from das_sglang.core.cost_model import verify_tokens

        budgets = [7, 0, 0, 3]
        assert verify_tokens(budgets) == 4 + 10
        assert verify_tokens(budgets, uniform_width=True) == 4 * 8
        assert verify_tokens([]) == 0 and verify_tokens([], uniform_width=True) == 0
        assert verify_tokens([0, 0]) == verify_tokens([0, 0], uniform_width=True) == 2
        with pytest.raises(ValueError, match="budgets must be >= 0, got -1"):
            verify_tokens([1, -1])

    def test_ragged_cost_follows_total_tokens(self):
        cost = CostModel(c_base_s=1e-3, c_tok_s=1e-5, c_kv_s=1e-7)
        kv = [100, 200, 300, 400]
        # same total tokens (14), different shapes: same ragged cost
        a = cost.verify_time([7, 0, 0, 3], kv)
        b = cost.verify_time([2, 3, 3, 2], kv)
        assert a == pytest.approx(b)
        assert a == pytest.approx(1e-3 + 1e-5 * 14 + 1e-7 * 1000)
        # uniform charges the padding: 4 x 8 tokens
        assert cost.verify_time([7, 0, 0, 3], kv, uniform_width=True) == pytest.approx(
            1e-3 + 1e-5 * 32 + 1e-7 * 1000)
        assert cost.verify_time([2, 3, 3, 2], kv, uniform_width=True) < cost.verify_time(
            [7, 0, 0, 3], kv, uniform_width=True)


def test_free_tokens_are_the_ridge_point():
    """Tokens within the weight-read time cost nothing; past them each costs c_tok. The GPU
    presets put the ridge where the matmuls take as long as reading the weights."""
    m = CostModel(c_base_s=0.010, c_tok_s=0.001, free_tokens=100)
    assert m.forward_time(1) == pytest.approx(0.010)
    assert m.forward_time(100) == pytest.approx(0.010)
    assert m.forward_time(150) == pytest.approx(0.060)
    np.testing.assert_allclose(m.forward_time(np.array([50, 300])), [0.010, 0.210])
    h100 = CostModel.preset("h100-32b")
    assert 150 < h100.free_tokens < 300
    assert h100.forward_time(h100.free_tokens) == pytest.approx(h100.c_base_s)
    assert CostModel.preset("cpu-tiny").free_tokens == 0
    with pytest.raises(ValueError, match="free_tokens"):
        CostModel(0.01, 0.001, free_tokens=-1)


def test_forward_time_of_one_forward_is_the_same_float_as_the_array_path():
    """A plan prices one forward with Python numbers (``forward_time(int, int)``): the
    scalar path gives bit for bit the float the numpy path gives, with and without free
    tokens, and the array path still broadcasts."""
    rng = np.random.default_rng(0)
    models = [CostModel(c_base_s=0.011, c_tok_s=3.1e-6, c_kv_s=2.3e-9),
              CostModel(c_base_s=0.0082, c_tok_s=1.7e-5, c_kv_s=0.0, free_tokens=192.0),
              *PRESETS.values()]
    for cost in models:
        for n, kv in [(0, 0), (1, 0), (191, 5), (192, 10), (193, 7), *zip(rng.integers(0, 9000, 50).tolist(),
                                                                         rng.integers(0, 2_000_000, 50).tolist())]:
            fast = cost.forward_time(n, kv)
            ref = cost.forward_time(np.array([n]), np.array([kv]))[0]
            assert type(fast) is float and fast == float(ref), (cost, n, kv)
            assert cost.forward_time(float(n), float(kv)) == fast
    out = models[0].forward_time(np.array([1, 2, 3]), 100)
    assert out.shape == (3,) and np.all(np.diff(out) > 0)
