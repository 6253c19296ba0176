"""What an epoch costs, as the equal-compute view and the frontier print it: the median of a run's epochs (a
stalled epoch on a shared CPU, the first epoch's one-time costs, do not move it), the seeds' range flagged where
they differ more than 1.5x."""
import math

from bench.report.compute import Line, line_cells
from bench.report.frontier import points
from bench.store.history import epoch_seconds, spent


def log(times: list[float], acc: float = 50.0) -> list[dict]:
    out, wall = [], 0.0
    for e, t in enumerate(times, 1):
        wall += t
        out.append({"epoch": e, "passes": 10.0 * e, "steps": 10 * e, "wall_s": wall, "epoch_time_s": t,
                    "test_acc": acc})
    return out


def test_a_stalled_epoch_does_not_move_it():
    steady = log([0.03] * 39 + [0.03])
    stalled = log([0.9] + [0.03] * 37 + [6.4, 0.03])  # a first epoch's warm-up and one epoch stalled
    assert epoch_seconds(steady) == epoch_seconds(stalled) == 0.03
    assert spent(stalled)["epoch_s"] == 0.03 and math.isclose(spent(stalled)["wall_s"], 8.44)


def test_a_log_without_epoch_times_falls_back_to_the_mean():
    old = [{k: v for k, v in h.items() if k != "epoch_time_s"} for h in log([1.0, 3.0])]
    assert spent(old)["epoch_s"] == 2.0


def test_seeds_that_differ_more_than_one_and_a_half_times_show_their_range():
    even = Line("SGD", logs=[log([0.03] * 4), log([0.04] * 4)], refs=[None, None], parallel_shares=[1.0, 1.0])
    assert line_cells(even)[3] == "0.04"
    uneven = Line("SGD", logs=[log([0.03] * 4), log([0.81] * 4)], refs=[None, None], parallel_shares=[1.0, 1.0])
    assert line_cells(uneven)[3] == "0.42 (0.03–0.81)"


def test_the_frontier_counts_typical_epochs():
    class View:
        lines = [Line("SGD", logs=[log([0.9] + [0.03] * 3)], refs=[None], parallel_shares=[1.0])]
    assert math.isclose(points(View)[0].wall, 0.12)
