"""Truncated backpropagation through time: `CascadeModel(..., window=W)` trains each batch window by window.

Each sample's outer sequence (`Ta` steps) is cut into windows of `W` outer
steps (the last one shorter where `W` does not divide `Ta`). For each window,
in order, the cascade runs from the state the previous window's forward pass
ended in (`Cascade.run(..., initial_state, return_state=True)`: A's states
for an A in state form, B's carried states in `carry` mode; no gradient flows
through them), the loss is the masked mean over that window's valid elements
(plus the models' regularization losses), and one optimizer step is taken
(`step.train_step`, so a window whose loss or gradients are not finite takes
no step, and neither does a window without a valid element). The next window
starts from the carried state and the updated weights. A plain A (not in
state form) starts from zeros in every window, as in any call of the runner.
A feedback B is teacher-forced on each window's targets (not with
`feedback_start="previous"`, whose first pair of a window would need the
previous window's last target: refused).

All the windows of one batch run inside one Keras `train_step` (a Python loop
over the windows, unrolled when the step is traced: `Ta` must be known then),
so `fit`, its callbacks and `BackupAndRestore` see one batch as before, and a
resumed run is exact. The optimizer takes one step per window with a valid
element (its `iterations` counts them). The loss reported for a batch is the
windows' losses averaged with their valid elements as weights; metrics are
taken over every window's valid rows.

`evaluate` (and `fit`'s validation) with a window runs the windows too, state
carried and no step taken: with an A in state form it is the loss of the
whole sequence, with the memory of one window.
"""

from __future__ import annotations

import tensorflow as tf

from cascade_cli.errors import ParameterError
from cascade_cli.options import check_int
from cascade_cli.state import carry_problem
from cascade_cli.train.step import batch_loss, train_step as one_step

__all__ = ["check_window", "test_step", "train_step"]


def check_window(window, cascade):
    """`window` as an int, or None (off); refuses a value or settings windows cannot train with, naming `window`.

    Args:
        window: the outer steps per window, a positive integer, or None.
        cascade: the `Cascade` training runs.
    """
    if window is None:
        return None
    window = check_int("window", window, minimum=1)
    problem = carry_problem(cascade, targets=bool(cascade.feedback))
    if problem is not None:
        raise ParameterError("window", f"cannot train in windows with these settings: {problem}; received "
                                       f"window={window}. Train with window=None (the whole sequence) instead.")
    return window


class _Carrying:
    """The training runner as `step.batch_loss` sees it, with its `run` continuing from `state`.

    Each `run` starts from the `CascadeState` the previous one handed out
    (zeros before the first) and keeps the one it ends in.
    """

    def __init__(self, cascade):
        self.cascade, self.state = cascade, None
        self.feedback = cascade.feedback

    def run(self, inputs, steps, **kwargs):
        *result, self.state = self.cascade.run(inputs, steps, initial_state=self.state, return_state=True, **kwargs)
        return tuple(result)


def _windows(data, window):
    """Each window's part of a batch: every tensor of `data` sliced on its outer axis (axis 1)."""
    tensors = [t for t in tf.nest.flatten(data) if t is not None]
    outer = tf.convert_to_tensor(tensors[0]).shape[1] if tensors else None
    if outer is None:
        raise ParameterError("window", f"needs the batches' outer length Ta known when the step is traced (their "
                                       f"shape's axis 1), received batches of shape "
                                       f"{tensors[0].shape if tensors else None}; received window={window}.")
    for start in range(0, max(outer, 1), window):
        yield tf.nest.map_structure(lambda t: None if t is None else t[:, start:start + window], data)


def _loss(model):
    """`step.batch_loss` of the model's compiled loss over a runner that carries its state from call to call."""
    carrying = _Carrying(model.training_cascade)
    return batch_loss(carrying, model._terms, models=(model.model_a, model.model_b), gate=model._stop_gate)


def train_step(model, data):
    """`CascadeModel.train_step` with `model.window` set: one optimizer step per window of the batch.

    Returns:
        The logs (`_report`'s, after the last window).
    """
    loss, refused, logs = _loss(model), model._refused_steps, None
    for part in _windows(data, model.window):
        result, finite = one_step(loss, model._unpack(part), variables=model.trainable_variables,
                                  optimizer=model.optimizer,
                                  only_if=None if refused is None else tf.equal(refused, 0.0),
                                  sampling=model._sampling)
        if refused is not None:  # a refused window takes no step after it (`fit` stops at the batch's end)
            refused.assign_add(1.0 - tf.cast(finite, tf.float32))
        logs = model._report(part[0], result)
    return logs


def test_step(model, data, **options):
    """`CascadeModel.test_step`'s loss with `model.window` set: the windows run in order, state carried, no step.

    Args:
        options: `batch_loss`'s (`CascadeModel._replica_options`).

    Returns:
        The logs (`_report`'s, after the last window).
    """
    loss, logs = _loss(model), None
    for part in _windows(data, model.window):
        logs = model._report(part[0], loss(*model._unpack(part), training=False, **options))
    return logs
