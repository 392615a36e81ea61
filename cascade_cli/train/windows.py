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

All the windows of one batch run inside one Keras `train_step` (one
`tf.while_loop` over the windows, so the step's graph does not grow with the
number of windows, and `Ta` may vary from batch to batch; under a
`tf.distribute` strategy with several replicas, whose all-reduces TensorFlow
does not allow in a while loop, the windows are unrolled instead and `Ta`
must be known when the step is traced), so `fit`, its callbacks and
`BackupAndRestore` see one batch as before, and a resumed run is exact. The optimizer takes one step per window with a valid
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
from cascade_cli.run import checks
from cascade_cli.run.state import CascadeState, carry_problem
from cascade_cli.train.step import batch_loss, replica_context

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

    Each `run` starts from `state` (a `CascadeState`) and keeps the one it ends in there.
    """

    def __init__(self, cascade):
        self.cascade, self.state = cascade, None
        self.feedback = cascade.feedback

    def run(self, inputs, steps, **kwargs):
        *result, self.state = self.cascade.run(inputs, steps, initial_state=self.state, return_state=True, **kwargs)
        return tuple(result)


def _over_windows(model, data, each):
    """Runs `each(loss, part)` on each window's part of a batch, in order, in one `tf.while_loop`.

    `part` is `data` with every tensor sliced on its outer axis (axis 1);
    `loss` is `step.batch_loss` of the model's compiled loss over a runner
    that starts from the state the previous window ended in (zeros for the
    first). One loop, not one unrolled copy per window: the step's graph does
    not grow with `Ta / window` (except on one of several replicas of a
    `tf.distribute` strategy, where the windows are unrolled).
    """
    window, cascade = model.window, model.training_cascade
    carrying = _Carrying(cascade)
    loss = batch_loss(carrying, model._terms, models=(model.model_a, model.model_b), gate=model._stop_gate)
    inputs = tf.convert_to_tensor(tf.nest.flatten(data)[0])
    outer = tf.shape(inputs)[1]
    a_states, b_states, previous, offset = checks.checked_state(cascade, None, inputs)  # zeros
    n_a, n_b = len(a_states), len(b_states)

    def body(k, offset, *states):
        states = list(states)
        carrying.state = CascadeState(tuple(states[:n_a]), tuple(states[n_a:n_a + n_b]),
                                      states[n_a + n_b] if previous is not None else None, offset)
        start = k * window
        each(loss, tf.nest.map_structure(lambda t: None if t is None else t[:, start:start + window], data))
        after = carrying.state
        states = [*after.a_states, *after.b_states, *([] if previous is None else [after.previous])]
        return (k + 1, tf.cast(after.offset, tf.int64), *states)

    states = [*a_states, *b_states, *([] if previous is None else [previous])]
    if replica_context() is None:
        tf.while_loop(lambda k, *_: k * window < outer, body, (tf.constant(0), offset, *states),
                      shape_invariants=(tf.TensorShape([]), tf.TensorShape([]),
                                        *(tf.TensorShape([None, *s.shape[1:]]) for s in states)))
        return
    # On one of several replicas the step all-reduces (the count, the verdict, the gradients), which TensorFlow
    # does not allow inside a while loop: the windows are unrolled, one copy of the step per window.
    if inputs.shape[1] is None:
        raise ParameterError("window", f"under a tf.distribute strategy with several replicas, needs the batches' "
                                       f"outer length Ta known when the step is traced, received batches of shape "
                                       f"{tuple(inputs.shape)}; received window={window}.")
    loop = (0, offset, *states)
    while loop[0] * window < inputs.shape[1]:
        loop = body(*loop)


def train_step(model, data):
    """`CascadeModel.train_step` with `model.window` set: one optimizer step per window of the batch.

    Returns:
        The metrics after the batch (`CascadeModel.get_metrics_result`).
    """
    _over_windows(model, data, model._step)
    return model.get_metrics_result()


def test_step(model, data, **options):
    """`CascadeModel.test_step`'s loss with `model.window` set: the windows run in order, state carried, no step.

    Args:
        options: `batch_loss`'s (`CascadeModel._replica_options`).

    Returns:
        The metrics after the batch (`CascadeModel.get_metrics_result`).
    """
    _over_windows(model, data, lambda loss, part: model._report(part[0], loss(*model._unpack(part), training=False,
                                                                               **options)))
    return model.get_metrics_result()
