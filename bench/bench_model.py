"""Model-level rows: one VideoBooth U-Net attn1 layer and one DiT spatial block per backend,
forward and forward+backward (bench/models.py)."""
from bench.measure import full_grid, measure_row, params
from bench.models import model_rows


def pytest_generate_tests(metafunc):
    if "row" in metafunc.fixturenames:
        metafunc.parametrize("row", params(model_rows(full_grid(metafunc.config))))


def test_model(benchmark, row, matmul_peak):
    measure_row(benchmark, row, matmul_peak)
