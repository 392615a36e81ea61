"""The demo: train briefly on `sample_data/`, generate on held-out inputs, export, and compare with the targets.

`run_demo` is what `cascade demo` runs; the command only renders its `DemoReport`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from cascade_cli import __version__, sample
from cascade_cli.errors import DataError
from cascade_cli.options import DEMO_EPOCHS

DEMO_LEARNING_RATE = 0.01
DEMO_FILES = {
    "trained": "trained",
    "result": "generated.h5",
    "padded": "generated_padded.npz",
    "csv": "generated.csv",
    "tokens_trained": "tokens/trained",
    "tokens_result": "tokens/generated.h5",
}
TOKEN_DEMO_EPOCHS = 15
"""The token task trains this long (a few seconds): long enough that the generator keeps to its rules."""
TOKEN_DEMO_MAX_STEPS = 8
"""The most steps the token generator may emit per pair before END; the longest pattern needs 5."""


@dataclasses.dataclass(frozen=True)
class DemoReport:
    """What the demo did.

    Attributes:
        paths: where each file went (`DEMO_FILES` keys, plus `model_a`, `model_b`, `history`).
        train_file: the training file it used.
        history: the training history (`training.fit`'s rows).
        summary: the generation's `GenerateSummary`.
        result: the generated `CascadeResult` (held-out inputs).
        targets: the true sequences of the same pairs, a `CascadeResult`.
        mse: the held-out mean squared error.
        baseline: the mse of predicting the mean of the targets.
        tokens: the feedback generator's part, a `TokenReport`.
    """

    paths: dict
    train_file: Path
    history: list
    summary: object
    result: object
    targets: object
    mse: float
    baseline: float
    tokens: "TokenReport" = None


@dataclasses.dataclass(frozen=True)
class TokenReport:
    """What the feedback generator did on the token task (`sample.TOKEN_FILE_NAMES`).

    Attributes:
        result: the generated `CascadeResult` (sampled tokens included).
        rules: `(N, Ta)` the rule of each held-out outer step (indices into `sample.TOKEN_RULES`).
        steps: `(N, Ta)` the true steps (pattern length + 1; 0 for a rest).
        targets: the true token ids, flat in value order.
        followed: how many generated patterns keep to their rule and length and end with END.
        patterns: how many held-out outer steps are patterns (not rests).
        starts: the distinct first notes the generator drew.
    """

    result: object
    rules: np.ndarray
    steps: np.ndarray
    targets: np.ndarray
    followed: int
    patterns: int
    starts: int


def demo_paths(out_dir, *, overwrite):
    """Checks the demo's folder before any work and returns where each of its files goes.

    Raises:
        DataError: `out_dir` is a file, cannot be written, or holds an earlier
            demo and `overwrite` is false.
    """
    from cascade_cli.train.checkpoints import check_out_dir

    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    paths = {key: out_dir / name for key, name in DEMO_FILES.items()}
    earlier = [name for key, name in DEMO_FILES.items() if paths[key].exists()]
    if earlier and not overwrite:
        raise DataError(
            f"out_dir '{out_dir}' holds an earlier demo ({', '.join(earlier)}); pass overwrite=True to "
            "replace it, or choose another out_dir."
        )
    return paths


def sample_data_dir():
    """The `sample_data/` folder next to the package source, or None when it is incomplete or missing."""
    folder = Path(__file__).resolve().parent.parent / "sample_data"
    names = (*sample.FILE_NAMES.values(), *sample.TOKEN_FILE_NAMES.values())
    return folder if all((folder / name).is_file() for name in names) else None


def run_demo(paths, *, epochs=DEMO_EPOCHS, overwrite=False, callbacks=None, progress=iter, say=print):
    """Trains on the sample training file, generates on the held-out inputs and exports the result.

    Args:
        paths: from `demo_paths`.
        epochs: training epochs.
        overwrite: replace an earlier demo's files (only those the demo writes).
        callbacks: a `TrainCallbacks` for training progress, or None.
        progress: wraps generation's batches (see `generation.generate_to_file`).
        say: called with a line of text for each stage.

    Returns:
        A `DemoReport`.
    """
    from cascade_cli.train.checkpoints import remove_training_run
    from cascade_cli.data import TrainingData, open_inputs
    from cascade_cli.generation import generate_to_file, resolve_steps
    from cascade_cli.model_files import load_model
    from cascade_cli.options import TrainConfig
    from cascade_cli.result import CascadeResult
    from cascade_cli.results_io import read_result, write_result
    from cascade_cli.run.cascade import Cascade
    from cascade_cli.steps import read_steps
    from cascade_cli.train.fit import fit

    trained = paths["trained"]
    trained.parent.mkdir(parents=True, exist_ok=True)
    if overwrite:
        remove_training_run(trained)  # the files an earlier demo's training wrote, and nothing else
    data_dir = sample_data_dir()
    if data_dir is None:
        data_dir = trained.parent / "sample_data"
        say(f"sample_data/ is not next to the package; building it in '{data_dir}'.")
        sample.build_sample_data(data_dir, seed=0)
    files = {key: data_dir / name for key, name in sample.FILE_NAMES.items()}
    model_a = load_model(files["model_a"], role="model A")
    model_b = load_model(files["model_b"], role="model B")

    say(f"Training on '{files['train']}' for {epochs} epochs.")
    config = TrainConfig(epochs=epochs, batch_size=32, learning_rate=DEMO_LEARNING_RATE, val_split=0.1, seed=0)
    with TrainingData(files["train"]) as data:
        history = fit(model_a, model_b, data, out_dir=trained, config=config, callbacks=callbacks)

    with open_inputs(files["inputs"]) as source:
        steps = resolve_steps(read_steps(files["steps"]), source, where=f"'{files['steps']}'")
        inputs = source.read(0, source.n_samples)
        attrs = {"model_a": str(trained / "model_a.keras"), "model_b": str(trained / "model_b.keras"),
                 "inputs": str(files["inputs"]), "steps": str(files["steps"]), "state": "reset",
                 "state_init": "zeros", "stop_rule": "none", "cascade_version": __version__}
        summary = generate_to_file(Cascade(model_a, model_b), source, steps, output=paths["result"], attrs=attrs,
                                   overwrite=overwrite, progress=progress)
    result = read_result(paths["result"])
    write_result(paths["padded"], result, format="npz", layout="padded", overwrite=overwrite)
    write_result(paths["csv"], result, format="csv", overwrite=overwrite)

    steps = np.broadcast_to(steps, result.lengths.shape)
    targets = CascadeResult(sample.sine_targets(inputs, steps), steps)
    mse = float(np.mean((result.values - targets.values) ** 2)) if result.total else 0.0
    baseline = float(np.var(targets.values)) if result.total else 0.0
    tokens = _token_demo(paths, data_dir, overwrite=overwrite, callbacks=callbacks, progress=progress, say=say)
    paths = {**paths, "model_a": trained / "model_a.keras", "model_b": trained / "model_b.keras",
             "history": trained / "history.csv", "tokens_generator": paths["tokens_trained"] / "cascade.keras"}
    return DemoReport(paths, files["train"], history, summary, result, targets, mse, baseline, tokens)


def _token_demo(paths, data_dir, *, overwrite, callbacks, progress, say):
    """Trains the token task's feedback B with teacher forcing, then samples from it until END."""
    from cascade_cli.train.checkpoints import remove_training_run
    from cascade_cli.data import TrainingData, open_inputs
    from cascade_cli.generation import generate_to_file
    from cascade_cli.h5 import open_h5
    from cascade_cli.model_files import load_model
    from cascade_cli.options import Sampler, StopRule, TrainConfig
    from cascade_cli.results_io import read_result
    from cascade_cli.run.cascade import Cascade
    from cascade_cli.train.fit import fit

    files = {key: data_dir / name for key, name in sample.TOKEN_FILE_NAMES.items()}
    trained = paths["tokens_trained"]
    trained.parent.mkdir(parents=True, exist_ok=True)
    if overwrite:
        remove_training_run(trained)
    model_a = load_model(files["tokens_model_a"], role="model A")
    model_b = load_model(files["tokens_model_b"], role="model B")
    say(f"Training the feedback generator on '{files['tokens_train']}' (teacher forcing) for "
        f"{TOKEN_DEMO_EPOCHS} epochs.")
    config = TrainConfig(epochs=TOKEN_DEMO_EPOCHS, batch_size=32, learning_rate=DEMO_LEARNING_RATE, val_split=0.1,
                         seed=0, loss="categorical-crossentropy", feedback=True)
    with TrainingData(files["tokens_train"]) as data:
        fit(model_a, model_b, data, out_dir=trained, config=config, callbacks=callbacks)
    generator = Cascade(model_a, model_b, feedback=True, sampler=Sampler.categorical(), seed=0,
                        max_steps=TOKEN_DEMO_MAX_STEPS, stop_rule=StopRule.token(sample.END_TOKEN))
    attrs = {"model_a": str(trained / "model_a.keras"), "model_b": str(trained / "model_b.keras"),
             "inputs": str(files["tokens_inputs"]), "feedback": True, "sampler": "categorical", "seed": 0,
             "stop_rule": "token", "stop_value": sample.END_TOKEN, "cascade_version": __version__}
    with open_inputs(files["tokens_inputs"]) as source:
        generate_to_file(generator, source, output=paths["tokens_result"], attrs=attrs, overwrite=overwrite,
                         progress=progress)
    with open_h5(files["tokens_inputs"]) as file:
        rules, steps, targets = file["rules"][...], file["steps"][...], file["targets"][...].argmax(axis=1)
    result = read_result(paths["tokens_result"])
    patterns = [(n, t) for n, t in zip(*np.nonzero(steps))]
    followed = sum(sample.follows_pattern(result.token_sequence(n, t), sample.TOKEN_RULES[rules[n, t]],
                                          int(steps[n, t]) - 1) for n, t in patterns)
    starts = len({int(result.token_sequence(n, t)[0]) for n, t in patterns if result.lengths[n, t]})
    return TokenReport(result, rules, steps, targets, int(followed), len(patterns), starts)
