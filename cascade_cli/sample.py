"""Build the small, deterministic example in `sample_data/`.

The task: every outer step `t` of a sample carries three features, a
frequency, an amplitude and a phase, and model B must draw `steps[n, t]`
points of that sine wave,

    targets[n, t, j] = amp * sin(freq * (j + 1) + phase),   j = 0 .. steps[n, t] - 1

Model A (a GRU) turns the features of each outer step into an IR vector and
model B (a `GRUCell` in step form) unrolls it, starting from a zero state for
every `(n, t)` pair (the `reset` state mode, initial state `zeros`). Both
models are saved untrained, so a few epochs of `cascade train` visibly lower
the loss.

Files written by `build_sample_data` (all small, together well under 2 MB):

- `model_a.keras`: inputs `(batch, Ta, 3)`, outputs `(batch, Ta, 16)`; batch
  size and `Ta` are left open.
- `model_b.keras`: step form, inputs `[x (batch, 16), state (batch, 32)]`,
  outputs `[y (batch, 1), state' (batch, 32)]`.
- `train.h5`: `inputs (512, 12, 3)` float32, `steps (512, 12)` int64 and flat
  `targets (sum(steps), 1)` float32 in value order (sample, then outer step,
  then inner step); the file's attributes describe the task.
- `inputs.h5` (dataset `inputs`, `(8, 12, 3)` float32) and `steps.txt` (8
  lines, one per sample, 12 white-space separated integers each): a held-out
  set for `cascade generate`.

A second, categorical task lives in `sample_data/tokens/` (`TOKEN_FILE_NAMES`),
for the feedback generator: every outer step names a rule (`up`, `down` or
`repeat`) and a pattern length; its notes start from a note drawn at random
(not given to the models), follow the rule, and end with the END token. Only a
B that sees what it emitted (`feedback=True`) can keep to the rule from a start
it chose itself; rests (outer steps with 0 inner steps) emit nothing.

- `tokens/model_a.keras`: `(batch, Ta, 5)` -> `(batch, Ta, 16)`.
- `tokens/model_b.keras`: feedback form, `[x (batch, 16), y_prev (batch, 7),
  state (batch, 32)]` -> `[logits (batch, 7), state']`.
- `tokens/train.h5`: `inputs (256, 8, 5)`, `steps (256, 8)` (pattern length + 1
  for END, 0 for a rest) and one-hot `targets (sum(steps), 7)` float32.
- `tokens/inputs.h5`: 8 held-out samples, `inputs` and their true `steps` and
  `targets` (for comparing what a trained generator emits).

Run it as `python -m cascade_cli.sample sample_data/`.
"""

import math
import sys
from pathlib import Path
from types import MappingProxyType

import h5py
import numpy as np

from cascade_cli.atomic import atomic_output

FEATURES = 3
"""Features per outer step: frequency, amplitude, phase."""
IR_SIZE = 16
"""Size `H` of the intermediate representation A emits per outer step."""
A_UNITS = 32
"""Units of model A's GRU."""
B_UNITS = 32
"""Units `U` of model B's `GRUCell` (its one state is `(batch, U)`)."""
OUTPUTS = 1
"""Size `O` of every inner-step output of B."""
TRAIN_SAMPLES = 512
HELDOUT_SAMPLES = 8
OUTER_STEPS = 12
MAX_INNER_STEPS = 8
ZERO_STEP_FRACTION = 0.2
"""Chance that an outer step has no inner steps at all."""
FREQ_RANGE = (0.5, 1.5)
AMP_RANGE = (0.5, 1.5)
PHASE_RANGE = (-math.pi / 2, math.pi / 2)

FILE_NAMES = MappingProxyType(
    {
        "model_a": "model_a.keras",
        "model_b": "model_b.keras",
        "train": "train.h5",
        "inputs": "inputs.h5",
        "steps": "steps.txt",
    }
)
"""Key of each file of the sine task in the dict `build_sample_data` returns, and its name."""

TOKEN_RULES = ("up", "down", "repeat")
"""Each pattern's rule: the next note is one higher, one lower (wrapping around) or the same."""
END_TOKEN = 0
"""The token that ends every pattern."""
TOKEN_NOTES = 6
"""Notes are the token ids 1 .. TOKEN_NOTES."""
TOKEN_OUTPUTS = TOKEN_NOTES + 1
"""Size `O` of B's outputs in the token task: END plus the notes."""
TOKEN_FEATURES = len(TOKEN_RULES) + 2
"""Features per outer step: the rule one-hot, the pattern length / TOKEN_MAX_LENGTH, and 1 for a pattern (0: rest)."""
TOKEN_MAX_LENGTH = 4
"""The most notes in a pattern (it emits one more step: END)."""
TOKEN_IR_SIZE = 16
TOKEN_B_UNITS = 32
TOKEN_TRAIN_SAMPLES = 256
TOKEN_HELDOUT_SAMPLES = 8
TOKEN_OUTER_STEPS = 8
TOKEN_FOLDER = "tokens"
TOKEN_FILE_NAMES = MappingProxyType(
    {
        "tokens_model_a": f"{TOKEN_FOLDER}/model_a.keras",
        "tokens_model_b": f"{TOKEN_FOLDER}/model_b.keras",
        "tokens_train": f"{TOKEN_FOLDER}/train.h5",
        "tokens_inputs": f"{TOKEN_FOLDER}/inputs.h5",
    }
)
"""Key of each file of the token task in the dict `build_sample_data` returns, and its path under the folder."""


def sine_targets(inputs, steps):
    """Computes the flat targets of the sine task in value order.

    Args:
        inputs: float array `(N, Ta, 3)` of (frequency, amplitude, phase).
        steps: int array `(N, Ta)`, every entry >= 0.

    Returns:
        float32 array `(sum(steps), 1)`: for each `(n, t)` in C order, the
        `steps[n, t]` values `amp * sin(freq * (j + 1) + phase)`.
    """
    steps = np.asarray(steps, dtype=np.int64).reshape(-1)
    features = np.asarray(inputs, dtype=np.float64).reshape(-1, FEATURES)
    pair = np.repeat(np.arange(steps.size), steps)
    starts = np.cumsum(steps) - steps
    inner = np.arange(pair.size) - np.repeat(starts, steps)
    freq, amp, phase = features[pair].T
    values = amp * np.sin(freq * (inner + 1) + phase)
    return values.astype(np.float32).reshape(-1, OUTPUTS)


def make_inputs(rng, samples):
    """Draws sine parameters for every outer step.

    Args:
        rng: a `numpy.random.Generator`.
        samples: number of samples `N`.

    Returns:
        float32 array `(N, OUTER_STEPS, 3)` of (frequency, amplitude, phase).
    """
    shape = (samples, OUTER_STEPS)
    freq = rng.uniform(*FREQ_RANGE, size=shape)
    amp = rng.uniform(*AMP_RANGE, size=shape)
    phase = rng.uniform(*PHASE_RANGE, size=shape)
    return np.stack([freq, amp, phase], axis=-1).astype(np.float32)


def make_steps(rng, samples):
    """Draws inner-step counts: 0 with chance `ZERO_STEP_FRACTION`, else 1..8.

    Args:
        rng: a `numpy.random.Generator`.
        samples: number of samples `N`.

    Returns:
        int64 array `(N, OUTER_STEPS)`.
    """
    shape = (samples, OUTER_STEPS)
    counts = rng.integers(1, MAX_INNER_STEPS + 1, size=shape)
    empty = rng.random(shape) < ZERO_STEP_FRACTION
    return np.where(empty, 0, counts).astype(np.int64)


def build_model_a():
    """Builds model A: `(batch, Ta, 3)` -> GRU -> Dense -> `(batch, Ta, 16)`."""
    import keras

    inputs = keras.Input(shape=(None, FEATURES), name="features")
    hidden = keras.layers.GRU(A_UNITS, return_sequences=True, name="gru")(inputs)
    ir = keras.layers.Dense(IR_SIZE, activation="tanh", name="ir")(hidden)
    return keras.Model(inputs, ir, name="model_a")


def build_model_b():
    """Builds model B in step form: `[x (batch, 16), s (batch, 32)]` -> `[y (batch, 1), s']`."""
    import keras

    x = keras.Input(shape=(IR_SIZE,), name="ir")
    state = keras.Input(shape=(B_UNITS,), name="state")
    hidden, [new_state] = keras.layers.GRUCell(B_UNITS, name="gru_cell")(x, [state])
    y = keras.layers.Dense(OUTPUTS, name="y")(hidden)
    return keras.Model([x, state], [y, new_state], name="model_b")


# ------------------------------------------------------------ the token task


def pattern_tokens(rule, length, start):
    """The tokens one outer step emits: `length` notes from `start` by `rule`, then `END_TOKEN`.

    >>> pattern_tokens("up", 3, 5)
    [5, 6, 1, 0]
    """
    step = {"up": 1, "down": -1, "repeat": 0}[rule]
    return [(start - 1 + step * j) % TOKEN_NOTES + 1 for j in range(length)] + [END_TOKEN]


def follows_pattern(tokens, rule, length):
    """Whether `tokens` (one pair's emitted ids) are `length` notes by `rule` from any start, then END."""
    tokens = [int(token) for token in tokens]
    if len(tokens) != length + 1 or not 1 <= tokens[0] <= TOKEN_NOTES:
        return False
    return tokens == pattern_tokens(rule, length, tokens[0])


def make_token_task(rng, samples):
    """Draws the token task: `(inputs, steps, tokens, rules, starts)`.

    Args:
        rng: a `numpy.random.Generator`.
        samples: number of samples `N`.

    Returns:
        `inputs (N, Ta, 5)` float32 (rule one-hot, length / TOKEN_MAX_LENGTH,
        1 for a pattern), `steps (N, Ta)` int64 (length + 1, or 0 for a
        rest), the flat `tokens (sum(steps),)` int64 in value order, and the
        drawn `rules (N, Ta)` (indices into `TOKEN_RULES`) and `starts`.
    """
    shape = (samples, TOKEN_OUTER_STEPS)
    rules = rng.integers(0, len(TOKEN_RULES), size=shape)
    lengths = rng.integers(1, TOKEN_MAX_LENGTH + 1, size=shape)
    starts = rng.integers(1, TOKEN_NOTES + 1, size=shape)
    active = rng.random(shape) >= ZERO_STEP_FRACTION
    inputs = np.zeros(shape + (TOKEN_FEATURES,), np.float32)
    inputs[..., : len(TOKEN_RULES)] = np.eye(len(TOKEN_RULES), dtype=np.float32)[rules] * active[..., None]
    inputs[..., -2] = np.where(active, lengths / TOKEN_MAX_LENGTH, 0.0)
    inputs[..., -1] = active
    steps = np.where(active, lengths + 1, 0).astype(np.int64)
    tokens = [token for n, t in np.ndindex(*shape) if active[n, t]
              for token in pattern_tokens(TOKEN_RULES[rules[n, t]], int(lengths[n, t]), int(starts[n, t]))]
    return inputs, steps, np.asarray(tokens, np.int64), rules, starts


def one_hot_targets(tokens):
    """`(total, TOKEN_OUTPUTS)` float32 one-hot rows of the ids `tokens (total,)`."""
    return np.eye(TOKEN_OUTPUTS, dtype=np.float32)[np.asarray(tokens, np.int64)]


def build_token_model_a():
    """Builds the token task's model A: `(batch, Ta, 5)` -> Dense -> `(batch, Ta, 16)`."""
    import keras

    inputs = keras.Input(shape=(None, TOKEN_FEATURES), name="pattern")
    ir = keras.layers.Dense(TOKEN_IR_SIZE, activation="tanh", name="ir")(inputs)
    return keras.Model(inputs, ir, name="tokens_model_a")


def build_token_model_b():
    """Builds the token task's B in feedback form: `[x, y_prev, state]` -> GRUCell -> Dense -> `[logits, state']`."""
    import keras

    x = keras.Input(shape=(TOKEN_IR_SIZE,), name="ir")
    previous = keras.Input(shape=(TOKEN_OUTPUTS,), name="y_prev")
    state = keras.Input(shape=(TOKEN_B_UNITS,), name="state")
    joined = keras.layers.Concatenate(name="joined")([x, previous])
    hidden, [new_state] = keras.layers.GRUCell(TOKEN_B_UNITS, name="gru_cell")(joined, [state])
    logits = keras.layers.Dense(TOKEN_OUTPUTS, name="logits")(hidden)
    return keras.Model([x, previous, state], [logits, new_state], name="tokens_model_b")


def build_sample_data(out_dir, *, seed=0):
    """Writes the sample models and data sets into `out_dir`, deterministically.

    The same `seed` gives the same arrays and the same model weights on every
    run. Each file is written under a temporary name and renamed into place.

    Args:
        out_dir: folder to write into; created if missing.
        seed: seeds numpy (data) and Keras (weight initialisation).

    Returns:
        dict from the `FILE_NAMES` keys (`model_a`, `model_b`, `train`,
        `inputs`, `steps`) and the `TOKEN_FILE_NAMES` keys to the paths written.
    """
    import keras

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {key: out_dir / name for key, name in FILE_NAMES.items()}

    rng = np.random.default_rng(seed)
    train_inputs = make_inputs(rng, TRAIN_SAMPLES)
    train_steps = make_steps(rng, TRAIN_SAMPLES)
    heldout_inputs = make_inputs(rng, HELDOUT_SAMPLES)
    heldout_steps = make_steps(rng, HELDOUT_SAMPLES)

    keras.utils.set_random_seed(seed)
    model_a = build_model_a()
    model_b = build_model_b()

    _write_atomic(paths["model_a"], model_a.save)
    _write_atomic(paths["model_b"], model_b.save)
    _write_atomic(
        paths["train"],
        lambda path: _write_train(
            path,
            inputs=train_inputs,
            steps=train_steps,
            targets=sine_targets(train_inputs, train_steps),
            seed=seed,
        ),
    )
    _write_atomic(paths["inputs"], lambda path: _write_inputs(path, heldout_inputs))
    _write_atomic(paths["steps"], lambda path: _write_steps(path, heldout_steps))
    paths.update(_build_token_data(out_dir, rng, seed=seed))
    return paths


def _build_token_data(out_dir, rng, *, seed):
    """Writes the token task's files under `out_dir / TOKEN_FOLDER`; returns their paths."""
    import keras

    (out_dir / TOKEN_FOLDER).mkdir(exist_ok=True)
    paths = {key: out_dir / name for key, name in TOKEN_FILE_NAMES.items()}
    train = make_token_task(rng, TOKEN_TRAIN_SAMPLES)
    heldout = make_token_task(rng, TOKEN_HELDOUT_SAMPLES)
    keras.utils.set_random_seed(seed)
    _write_atomic(paths["tokens_model_a"], build_token_model_a().save)
    _write_atomic(paths["tokens_model_b"], build_token_model_b().save)
    for key, (inputs, steps, tokens, rules, _) in (("tokens_train", train), ("tokens_inputs", heldout)):
        _write_atomic(paths[key], lambda path: _write_token_file(path, inputs=inputs, steps=steps, tokens=tokens,
                                                                  rules=rules, seed=seed))
    return paths


def _write_token_file(path, *, inputs, steps, tokens, rules, seed):
    """Writes a token task file: `inputs`, `steps`, one-hot `targets`, the `rules` and the task attributes."""
    with h5py.File(path, "w") as file:
        file.create_dataset("inputs", data=inputs)
        file.create_dataset("steps", data=steps)
        file.create_dataset("targets", data=one_hot_targets(tokens))
        file.create_dataset("rules", data=rules.astype(np.int64))
        file.attrs["task"] = "tokens"
        file.attrs["description"] = (
            "Each outer step names a rule (up, down, repeat: one-hot) and a pattern length (length / 4), or is a "
            "rest (all zeros, 0 steps). Its targets are `length` notes (ids 1..6) from a random start by the "
            "rule, wrapping around, then END (id 0), one-hot. Train B in feedback form with teacher forcing."
        )
        file.attrs["rule_names"] = list(TOKEN_RULES)
        file.attrs["end_token"] = END_TOKEN
        file.attrs["max_pattern_length"] = TOKEN_MAX_LENGTH
        file.attrs["targets_layout"] = "flat"
        file.attrs["value_order"] = "sample, outer step, inner step"
        file.attrs["seed"] = seed


def _write_train(path, *, inputs, steps, targets, seed):
    """Writes `train.h5`: `inputs`, `steps`, flat `targets` and the task attributes."""
    with h5py.File(path, "w") as file:
        file.create_dataset("inputs", data=inputs)
        file.create_dataset("steps", data=steps)
        file.create_dataset("targets", data=targets)
        file.attrs["task"] = "sine"
        file.attrs["description"] = (
            "Each outer step carries (frequency, amplitude, phase); model B must emit "
            "amp * sin(freq * (j + 1) + phase) for its inner steps j = 0 .. steps - 1, "
            "each (n, t) starting from a zero state (state mode reset, init zeros)."
        )
        file.attrs["formula"] = "amp * sin(freq * (j + 1) + phase)"
        file.attrs["feature_names"] = ["frequency", "amplitude", "phase"]
        file.attrs["frequency_range"] = FREQ_RANGE
        file.attrs["amplitude_range"] = AMP_RANGE
        file.attrs["phase_range"] = PHASE_RANGE
        file.attrs["max_inner_steps"] = MAX_INNER_STEPS
        file.attrs["targets_layout"] = "flat"
        file.attrs["value_order"] = "sample, outer step, inner step"
        file.attrs["state_mode"] = "reset"
        file.attrs["state_init"] = "zeros"
        file.attrs["seed"] = seed


def _write_inputs(path, inputs):
    """Writes an inputs file with one dataset, `inputs (N, Ta, F)`."""
    with h5py.File(path, "w") as file:
        file.create_dataset("inputs", data=inputs)


def _write_steps(path, steps):
    """Writes a steps file: one line per sample, integers split by spaces."""
    lines = (" ".join(str(count) for count in row) for row in steps)
    Path(path).write_text("".join(line + "\n" for line in lines))


def _write_atomic(path, write):
    """Calls `write(temporary_path)` in `path`'s folder, then renames it onto `path`."""
    path = Path(path)
    with atomic_output(path, overwrite=True, suffix=path.suffix) as temporary:
        write(str(temporary))


def main(argv=None):
    """Builds the sample data into the folder given on the command line.

    Example: `python -m cascade_cli.sample sample_data/`.
    """
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m cascade_cli.sample DIR", file=sys.stderr)
        return 2
    paths = build_sample_data(argv[0])
    for path in paths.values():
        print(f"{path}  {path.stat().st_size} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
