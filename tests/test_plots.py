"""The plots of a run drawn in a child process (`draw_aside`), and drawn here when the
child fails: never a missing plot."""
import numpy as np

from tlapp.reporting import plots


def spy_of(plot, called):
    """A stand-in with the plot's name: the child draws the real one by name, the parent
    falls back to this one."""
    def spy(*args):
        called.append(args)
        plot(*args)

    spy.__name__ = plot.__name__
    return spy


def test_the_child_process_draws_the_plots(tmp_path):
    called = []
    curve = np.linspace(0.01, 1, 50)
    finish = plots.draw_aside([
        (spy_of(plots.plot_coverage, called), (curve, 1 - curve / 2, tmp_path / "a.png", None)),
        (spy_of(plots.plot_history, called), ([{"stage": "head", "loss": 1.0, "accuracy": 0.5},
                                               {"stage": "head", "loss": 0.5, "accuracy": 0.8}],
                                              tmp_path / "plots" / "b.png"))], tmp_path)
    finish()
    assert called == []  # drawn by the child, not here
    for path in (tmp_path / "a.png", tmp_path / "plots" / "b.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "plots"]  # no jobs file


def test_a_failed_child_costs_no_plot(tmp_path):
    called = []

    def not_a_plot(path):  # unknown to the child's module: it fails on it
        called.append(path)
        path.write_bytes(b"drawn here")

    curve = np.linspace(0.01, 1, 5)
    finish = plots.draw_aside([(not_a_plot, (tmp_path / "x.png",)),
                               (spy_of(plots.plot_coverage, called),
                                (curve, curve, tmp_path / "c.png", (0.5, 0.9)))], tmp_path)
    finish()
    assert len(called) == 2  # both drawn here after the child failed
    assert (tmp_path / "x.png").read_bytes() == b"drawn here"
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / ".plots.pickle").exists()


def test_a_coverage_curve_of_many_images_is_drawn_and_sent_through_2000_points(tmp_path):
    from types import SimpleNamespace

    from tlapp.pipeline.folder import write_decision_plots

    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(3), 10_000)
    labels = rng.integers(0, 3, 10_000)
    queued = []
    write_decision_plots(tmp_path, None, None, {"test": probabilities},
                         SimpleNamespace(labels={"test": labels}),
                         lambda plot, *args: queued.append((plot, args)))
    ((plot, (coverage, accuracy, path, chosen)),) = queued
    assert plot is plots.plot_coverage and path == tmp_path / "plots" / "coverage.png"
    assert len(coverage) == len(accuracy) == 2000 and chosen is None
    assert coverage[0] == 1 / 10_000 and coverage[-1] == 1.0  # first and last kept
    assert np.isclose(accuracy[-1], np.mean(probabilities.argmax(axis=1) == labels))
    assert list(plots.curve_points(3)) == [0, 1, 2] and len(plots.curve_points(0)) == 0
