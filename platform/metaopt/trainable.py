"""The one base of every capability's Tune trainable: what each of them needs from a trial process, done once.

A capability's trainable (``pbt``, ``federated``, ``objectives``, ``symbolic``, ``posttrain``) says only what is
its own: what a trial builds (:meth:`Trainable.start`), what one iteration does (``step``), and what its
checkpoint holds. This base does the rest, as every trial needs it:

- Tune's per-trial loggers are quietened (a line per checkpoint from every actor drowns the driver's table);
- a torch trainable gets its torch thread count (trials already run in parallel; oversubscription only slows
  them down);
- a checkpoint is a folder: by default one ``torch.save`` state written atomically and read back without running
  pickled code (:func:`metaopt.tuning.save_state` / :func:`metaopt.tuning.read_state`);
- after a restore the iteration count is the one saved *inside* the checkpoint, not the one Tune associated with
  it, which can be stale (Ray 2.60 may hand an exploiting PBT trial a later checkpoint of a still-running clone):
  written through :func:`metaopt.compat.tune.set_iteration`, Tune's private counter's only door.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ray import tune

from metaopt.compat.tune import set_iteration
from metaopt.tuning import STATE_FILE, checkpoint_dir, read_state, save_state

#: The loggers that write an INFO line per checkpoint / result file in every trial process.
TUNE_TRIAL_LOGGERS = ("ray.tune.trainable.trainable", "ray.train._internal.storage")
#: Environment variable that overrides the torch threads of a trial process (default 1).
TORCH_THREADS_VARIABLE = "METAOPT_TORCH_THREADS"


def quiet_tune_loggers() -> None:
    """Only warnings and errors from Tune's per-trial loggers in this process."""
    for name in TUNE_TRIAL_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def torch_threads() -> int:
    """Torch threads of one trial process: ``METAOPT_TORCH_THREADS``, at least 1, default 1."""
    return max(1, int(os.environ.get(TORCH_THREADS_VARIABLE, "1")))


class Trainable(tune.Trainable):
    """A Tune class trainable with metaopt's per-process set-up, checkpoint folder and restored iteration.

    A subclass writes :meth:`start` and ``step``, and its checkpoint as either

    - :meth:`state_dict` / :meth:`load_state_dict`: one ``torch.save`` state in :attr:`state_file` (tensors,
      primitive containers and numpy arrays), or
    - :meth:`write_checkpoint` / :meth:`read_checkpoint`: files of its own format in the checkpoint folder.

    :meth:`load_state_dict` / :meth:`read_checkpoint` return the iteration the restored state had reached (the
    trial counts on from it), or None to keep the count Tune restored. ``config['verbose_actors']`` keeps Tune's
    per-trial INFO lines. A subclass that supports Tune's actor reuse writes ``reset_config`` itself (what a
    trial may keep from the previous one differs per capability).
    """

    #: Does this trainable train with torch (then its process gets :func:`torch_threads` threads)?
    uses_torch: bool = False
    #: File name of the default (torch) checkpoint state inside the checkpoint folder.
    state_file: str = STATE_FILE

    def setup(self, config: dict[str, Any]) -> None:
        if not config.get("verbose_actors"):
            quiet_tune_loggers()
        if self.uses_torch:
            import torch

            torch.set_num_threads(torch_threads())
        self.start(config)

    def start(self, config: dict[str, Any]) -> None:
        """Build what this trial trains (called once per trial process; Tune loads a checkpoint afterwards)."""
        raise NotImplementedError

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint_dir: str) -> None:
        # None: the checkpoint is the folder Tune handed us (Tune would pickle a returned dict into it).
        self.write_checkpoint(Path(checkpoint_dir))

    def load_checkpoint(self, checkpoint: str | dict | None) -> None:
        if checkpoint is None:  # Tune hands a folder trainable the folder (or a dict naming it), never nothing
            raise ValueError("load_checkpoint: Tune handed no checkpoint folder")
        iteration = self.read_checkpoint(checkpoint_dir(checkpoint))
        if iteration is not None:
            set_iteration(self, iteration)

    def write_checkpoint(self, directory: Path) -> None:
        """This trial's state into its checkpoint folder (default: :meth:`state_dict`, saved atomically)."""
        save_state(self.state_dict(), str(directory), self.state_file)

    def read_checkpoint(self, directory: Path) -> int | None:
        """This trial's state from a checkpoint folder; the iteration it had reached, or None (Tune's count)."""
        return self.load_state_dict(read_state(directory / self.state_file))

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> int | None:
        raise NotImplementedError
