"""Lineage schedule reconstruction from PBT exploit events: pure functions, hand-checked scenarios."""

import json

import pytest

from metaopt.optim import piecewise_constant
from metaopt.pbt import lineage
from metaopt.pbt.lineage import ExploitEvent


def event(target, clone, new_lr, resumed=None, target_iter=0, clone_iter=0):
    return ExploitEvent(target, clone, target_iter, clone_iter, {"lr": new_lr}, resumed_step=resumed)


def test_record_lr_appends_changes_and_replaces_same_step():
    history = lineage.record_lr([], 0, 0.1)
    assert history == [(0, 0.1)]
    assert lineage.record_lr(history, 50, 0.1) == [(0, 0.1)]  # unchanged lr is not repeated
    history = lineage.record_lr(history, 100, 0.2)
    assert history == [(0, 0.1), (100, 0.2)]
    assert lineage.record_lr(history, 100, 0.3) == [(0, 0.1), (100, 0.3)]  # same step: replaced
    # restoring an older checkpoint drops what came after it
    assert lineage.record_lr([(0, 0.1), (100, 0.2), (200, 0.4)], 150, 0.5) == [(0, 0.1), (100, 0.2), (150, 0.5)]


def test_chain_of_exploits_follows_the_lineage():
    # B copies A at iteration 4 (lr 0.12); later A copies B at iteration 8 (lr 0.15): A's model was trained
    # by A (0.1) for 4 iterations, then by B with 0.12, then by A with 0.15.
    events = [event("B", "A", 0.12, resumed=400), event("A", "B", 0.15, resumed=800)]
    schedules = lineage.replay_events({"A": 0.1, "B": 0.01}, events)
    assert schedules["B"] == [(0, 0.1), (400, 0.12)]
    assert schedules["A"] == [(0, 0.1), (400, 0.12), (800, 0.15)]


def test_exploit_of_an_older_checkpoint_cuts_the_clone_history():
    # C copies A at step 40 although A has moved on and changed lr at step 60 since.
    events = [event("A", "B", 0.3, resumed=60), event("C", "A", 0.05, resumed=40)]
    schedules = lineage.replay_events({"A": 0.1, "B": 0.2, "C": 0.9}, events)
    assert schedules["A"] == [(0, 0.2), (60, 0.3)]
    assert schedules["C"] == [(0, 0.2), (40, 0.05)]


def test_unknown_clone_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown trial 'Z'"):
        lineage.replay_events({"A": 0.1}, [event("A", "Z", 0.2, resumed=1)])


def test_resume_steps_reads_restore_point_from_target_rows():
    # T reports steps 10..80 with lr 0.01, then continues from the clone's step-40 checkpoint with lr 0.02.
    rows = {"T": [(10 * i, 0.01) for i in range(1, 9)] + [(10 * i, 0.02) for i in range(5, 11)], "S": [(10, 0.5)]}
    (resolved,) = lineage.resume_steps([event("T", "S", 0.02, target_iter=7, clone_iter=8)], rows, 10)
    assert resolved.resumed_step == 40


def test_resume_steps_trusts_steps_over_tune_iterations():
    # Tune logged the clone at iteration 2, but the checkpoint it restored was at step 80 (iteration 4):
    # the target's next row says step 100, so the lineage switches at 80.
    rows = {"T": [(20, 0.003), (40, 0.003), (100, 0.04), (120, 0.04)], "S": [(20, 0.05)]}
    (resolved,) = lineage.resume_steps([event("T", "S", 0.04, target_iter=2, clone_iter=2)], rows, 20)
    assert resolved.resumed_step == 80


def test_resume_steps_needs_a_row_with_the_new_lr():
    with pytest.raises(ValueError, match="never reported"):
        lineage.resume_steps([event("T", "S", 0.7)], {"T": [(1, 0.01)], "S": [(1, 0.5)]}, 1)


def test_read_pbt_global_parses_tune_lines(tmp_path):
    path = tmp_path / "pbt_global.txt"
    path.write_text(json.dumps(["1_lr=0.1", "0_lr=0.2", 7, 8, {"lr": 0.2}, {"lr": 0.24}]) + "\n\n")
    (parsed,) = lineage.read_pbt_global(path)
    assert (parsed.target, parsed.clone, parsed.target_iteration, parsed.clone_iteration) == (
        "1_lr=0.1",
        "0_lr=0.2",
        7,
        8,
    )
    assert parsed.new_config["lr"] == 0.24
    assert lineage.read_pbt_global(tmp_path / "absent.txt") == []
    path.write_text("not json\n")
    with pytest.raises(ValueError, match="line 1"):
        lineage.read_pbt_global(path)


def test_dense_view_matches_the_replay_schedule():
    history = [(0, 0.1), (30, 0.2), (75, 0.05)]
    dense = lineage.lr_at_steps(history, 100)
    schedule = piecewise_constant(history)
    assert dense == [schedule(s) for s in range(100)]
    assert lineage.describe(history) == "0:0.1 -> 30:0.2 -> 75:0.05"


def test_same_schedule_tolerates_csv_round_trip_only():
    assert lineage.same_schedule([(0, 0.1), (5, 0.3)], [(0, 0.1 + 1e-17), (5, 0.3)])
    assert not lineage.same_schedule([(0, 0.1), (5, 0.3)], [(0, 0.1), (6, 0.3)])
    assert not lineage.same_schedule([(0, 0.1)], [(0, 0.1001)])


def test_an_exploit_overwritten_before_training_is_skipped():
    # T copies S (lr 0.3) but is exploited again, copying U (lr 0.05), before it reports anything with 0.3
    rows = {"T": [(10, 0.01), (20, 0.01), (30, 0.05)], "S": [(10, 0.3)], "U": [(10, 0.05)]}
    events = [event("T", "S", 0.3), event("T", "U", 0.05)]
    (resolved,) = lineage.resume_steps(events, rows, 10)
    assert (resolved.clone, resolved.resumed_step) == ("U", 20)


def write_pbt_global(path, *lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return lineage.read_pbt_global(path)


def test_exploit_keeping_the_lr_is_located_by_the_step_jump(tmp_path):
    # T (lr 0.01) copies S's step-40 checkpoint at step 80 and keeps lr 0.01 (e.g. clipped at a bound); then U
    # copies T with a new lr. Neither event may be dropped, nor send the sweep to the fallback path.
    events = write_pbt_global(
        tmp_path / "pbt_global.txt",
        ["T", "S", 7, 4, {"lr": 0.5}, {"lr": 0.01}],
        ["U", "T", 7, 7, {"lr": 0.01}, {"lr": 0.02}],
    )
    rows = {
        "T": [(10 * i, 0.01) for i in range(1, 9)] + [(10 * i, 0.01) for i in range(5, 9)],
        "S": [(10 * i, 0.5) for i in range(1, 9)],
        "U": [(10 * i, 0.003) for i in range(1, 9)] + [(90, 0.02)],
    }
    resolved = lineage.resume_steps(events, rows, 10)
    assert [(e.target, e.resumed_step) for e in resolved] == [("T", 40), ("U", 80)]
    schedules = lineage.replay_events({"T": 0.01, "S": 0.5, "U": 0.003}, resolved)
    assert schedules["T"] == [(0, 0.5), (40, 0.01)]  # S's weights, then T's unchanged lr
    assert schedules["U"] == [(0, 0.5), (40, 0.01), (80, 0.02)]


@pytest.mark.parametrize("target_iteration", [4, 3])  # synchronous (paused at the boundary) / asynchronous
def test_exploit_keeping_the_lr_at_the_same_step_uses_the_perturbation_boundary(tmp_path, target_iteration):
    # T and S both at step 40 (a boundary of 4 iterations x 10 steps): T's rows run on without any jump.
    (ev,) = write_pbt_global(tmp_path / "pbt_global.txt", ["T", "S", target_iteration, 4, {"lr": 0.5}, {"lr": 0.01}])
    rows = {"T": [(10 * i, 0.01) for i in range(1, 9)], "S": [(10 * i, 0.5) for i in range(1, 9)]}
    (resolved,) = lineage.resume_steps([ev], rows, 10, boundary_steps=40)
    assert resolved.resumed_step == 40
    assert lineage.replay_events({"T": 0.01, "S": 0.5}, [resolved])["T"] == [(0, 0.5), (40, 0.01)]


def test_exploit_keeping_the_lr_but_never_reporting_again_is_still_an_error():
    with pytest.raises(ValueError, match="never reported"):
        lineage.resume_steps([event("T", "S", 0.01, target_iter=2)], {"T": [(10, 0.01), (20, 0.01)]}, 10)
