"""Entry-point module of the built-in dictionary learners."""

from __future__ import annotations

from ..hookspecs import hookimpl


@hookimpl
def mi_dictionary_learners() -> list[type]:
    from .sae import ReluL1Learner
    from .topk import TopKLearner

    return [ReluL1Learner, TopKLearner]
