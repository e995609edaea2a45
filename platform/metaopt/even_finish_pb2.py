"""PB2 with :class:`metaopt.even_finish.EvenFinish`, in a module of its own: importing PB2 imports GPy and
scikit-learn, which a PBT sweep never needs."""

from __future__ import annotations

from ray.tune.schedulers.pb2 import PB2

from metaopt.even_finish import EvenFinish


class EvenFinishPB2(EvenFinish, PB2):
    """Tune's PB2 (Parker-Holder et al. 2020) with :class:`EvenFinish`'s end-of-sweep levelling."""
