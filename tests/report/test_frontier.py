"""The accuracy-vs-compute frontier (bench.report.frontier) on hand-made points and epoch logs, and a table's
labelled columns (a minimizer under a schedule) from tables.toml through the plan to the report's cells."""
import pytest

from bench.report.compute import CellView, Line
from bench.report.frontier import Point, on_frontier, plot_frontier, points
from bench.tables.layout import columns, layout, minimizer_name


def pt(label, acc, passes, wall=0.0):
    return Point(label, acc, 0.0, passes, wall, passes, 1)


def test_a_point_is_on_the_frontier_when_none_is_as_good_for_no_more_compute():
    pts = [pt("sgd", 80, 100), pt("sam", 85, 200), pt("asam", 84, 200), pt("late", 85, 120), pt("every5", 79, 120)]
    assert [p.label for p in on_frontier(pts)] == ["sgd", "late"]  # late: sam's accuracy for less; asam, every5 beaten


def test_ties_and_the_cost_axis():
    pts = [pt("a", 80, 100, wall=9), pt("b", 80, 100, wall=5), pt("c", 90, 300, wall=1)]
    assert [p.label for p in on_frontier(pts)] == ["a", "b", "c"]  # equal points do not beat each other
    assert [p.label for p in on_frontier(pts, "wall")] == ["c"]  # c is fastest and best in seconds


def log(accs, passes_per_epoch, wall=1.0):
    return [{"epoch": e + 1, "test_acc": a, "passes": passes_per_epoch * (e + 1), "steps": 10 * (e + 1),
             "wall_s": wall * (e + 1)} for e, a in enumerate(accs)]


def test_points_are_means_over_seeds_with_their_spread_and_parallel_passes(tmp_path):
    view = CellView("t", "r", "", "m", [
        Line("SGD", [log([50, 70], 10), log([50, 72], 10)], [None, None]),
        Line("SAMPa", [log([60, 80], 20)], [None], parallel_shares=[0.5]),
        Line("empty", [], [])])
    sgd, sampa = points(view)
    assert (sgd.acc, round(sgd.acc_sd, 4), sgd.passes, sgd.wall, sgd.seeds) == (71, 1.4142, 20, 2.0, 2)
    assert (sampa.passes, sampa.parallel) == (40, 20)
    drawn = []
    assert plot_frontier(view, "cell", drawn.append) and len(drawn) == 1
    assert not plot_frontier(CellView("t", "r", "", "m", view.lines[:1]), "cell", drawn.append)  # one point: none


def test_labelled_columns_carry_their_settings_into_the_cells():
    spec = {"title": "t", "task": "digits-noise", "rows": [{"label": "r", "noise": 0.4}], "metrics": {"a": "b"},
            "settings": {"model": "mlp", "epochs": 8},
            "minimizers": ["sgd", "sam", {"label": "SAM every 5", "minimizer": "sam", "sam_every": 5}],
            "presets": {"p": {"settings": {"epochs": 4}}}}
    assert columns(spec) == {"sgd": ("sgd", {}), "sam": ("sam", {}), "SAM every 5": ("sam", {"sam_every": 5})}
    cells = list(layout("x", spec, "p").cells())
    assert [(c.column, c.minimizer, c.settings.get("sam_every"), c.settings["epochs"]) for c in cells] == [
        ("sgd", "sgd", None, 4), ("sam", "sam", None, 4), ("SAM every 5", "sam", 5, 4)]
    assert (minimizer_name(spec, "SAM every 5"), minimizer_name(spec, "sam")) == ("SAM every 5", "SAM")


@pytest.mark.parametrize("bad", [[{"minimizer": "sam"}], ["sam", "sam"], ["sam", {"label": "sam", "minimizer": "sam"}]])
def test_a_column_without_a_label_or_twice_is_refused(tmp_path, bad):
    from bench.errors import UserError
    from bench.tables.layout import load_tables
    path = tmp_path / "tables.toml"
    cols = ", ".join(f'"{c}"' if isinstance(c, str) else "{ " + ", ".join(f'{k} = "{v}"' for k, v in c.items()) + " }"
                     for c in bad)
    path.write_text(f'[x]\ntitle = "t"\ntask = "digits-noise"\nrows = [{{ label = "r" }}]\nmetrics = {{ a = "b" }}\n'
                    f"minimizers = [{cols}]\n")
    with pytest.raises(UserError, match="table \\[x\\]"):
        load_tables(path)
