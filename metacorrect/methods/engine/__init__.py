"""The meta-gradient engine: no method names in here (docs/design.md has the maths and the file map).

Two entry points give every method's meta-gradient:

- `lookahead_meta_grad` (look-ahead first, before the real step; the step is pluggable: `Step.optimizer()`,
  `Step.plain(lr, ...)`, `Step.identity()`),
- `MetaGradEngine` (real step first: the real step is the look-ahead; k-step discounts).

Both end in `functional.target_grad`, the one place that branches between the fast (JVP) and the exact
(double backward) path. fp16's loss scales (the real step's GradScaler, the meta passes' `MetaLossScale`) are
in `scaling`.
"""
from metacorrect.methods.engine.functional import (FAMILIES, META_GRADS, Family, MetaGrad, clean_gradient,
                                                   frozen_running_stats, lower_jvp, lower_loss, lower_terms,
                                                   model_state, target_grad)
from metacorrect.methods.engine.lookahead import LookaheadResult, lookahead_meta_grad
from metacorrect.methods.engine.realstep import DISCOUNTS, MetaGradEngine, MetaGradResult, Snapshot
from metacorrect.methods.engine.rows import Rows, global_rows, normalised_weights, rows_of
from metacorrect.methods.engine.scaling import LossScales, MetaLossScale
from metacorrect.methods.engine.sgd import SGDRule, Step, first_group, lookahead_steps, sgd_rules

__all__ = ["DISCOUNTS", "FAMILIES", "META_GRADS", "Family", "LookaheadResult", "LossScales", "MetaGrad",
           "MetaGradEngine", "MetaGradResult", "MetaLossScale", "Rows", "SGDRule", "Snapshot", "Step",
           "clean_gradient", "first_group", "frozen_running_stats", "global_rows", "lookahead_meta_grad",
           "lookahead_steps", "lower_jvp", "lower_loss", "lower_terms", "model_state", "normalised_weights",
           "rows_of", "sgd_rules", "target_grad"]
