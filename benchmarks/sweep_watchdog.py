"""A Tune callback the benchmarks share: abort a sweep that stops making progress."""

import time


def make_watchdog(stall_seconds: float):
    """A Tune callback that aborts a sweep in which no trial has started or reported for ``stall_seconds``.

    Guards against a livelock seen with synchronous PBT and the step budget: a trial that reaches its step
    budget at a sync boundary completes without PBT's on_trial_result, so a trial paused at that boundary
    waits for a sync that never comes and Tune's loop spins forever (see benchmarks/README.md).
    """
    from ray.tune import Callback

    class Watchdog(Callback):
        def __init__(self):
            self.last = time.perf_counter()
            self.stalled: str | None = None

        def on_trial_start(self, iteration, trials, trial, **info):
            self.last = time.perf_counter()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.last = time.perf_counter()

        def on_step_end(self, iteration, trials, **info):
            if time.perf_counter() - self.last > stall_seconds:
                self.stalled = ", ".join(
                    f"{t.trial_id}:{t.status}@it{(t.last_result or {}).get('training_iteration')}"
                    f"/step{(t.last_result or {}).get('step')}"
                    for t in trials
                )
                raise RuntimeError(f"sweep stalled: no trial progress for {stall_seconds:.0f} s ({self.stalled})")

    return Watchdog()
