"""The op alone: every shape set x schedule x backend x mode x dtype of the registry
(bench/shapes.py). ``pytest bench -m smoke`` is the CPU smoke run; see docs/bench.md."""
from bench.measure import full_grid, measure_row, params
from bench.shapes import op_rows


def pytest_generate_tests(metafunc):
    if "row" in metafunc.fixturenames:
        metafunc.parametrize("row", params(op_rows(full_grid(metafunc.config))))


def test_attention(benchmark, row, matmul_peak):
    measure_row(benchmark, row, matmul_peak)
