"""Packed generators: model A, model B and the runner settings in one `.keras` file (`cascade pack`).

>>> generator = pack_generator("a.keras", "b.keras", "generator.keras", settings={"max_steps": 20})
"""

from cascade_cli.options import resolve_runner_settings

UNPACKED_SETTINGS = ("run_eagerly",)
"""Runner settings a packed generator does not keep: how one process runs it, not what it generates."""


def pack_generator(model_a, model_b, output, *, settings=None, overwrite=False, safe_mode=True,
                   allow_legacy_h5=False):
    """Loads model A and model B, checks them with the runner settings and saves them as one generator file.

    Args:
        model_a, model_b: the model files (`model_files.load_pair`).
        output: the `.keras` file to write, under a temporary name renamed
            into place (`atomic.atomic_output`).
        settings: runner settings given, `{name: value}` (None: not given);
            the others take their defaults (`options.resolve_runner_settings`).
        overwrite: whether `output` may be replaced.
        safe_mode, allow_legacy_h5: how the model files load.

    Returns:
        The `CascadeModel` written.

    Raises:
        ParameterError: a runner setting that cannot apply (naming it).
        CascadeError: the models do not load or do not fit together; the output cannot be written.
    """
    from cascade_cli.atomic import atomic_output
    from cascade_cli.train.keras_model import CascadeModel
    from cascade_cli.model_files import load_pair

    given = dict(settings or {})
    pair = load_pair(model_a, model_b, safe_mode=safe_mode, allow_legacy_h5=allow_legacy_h5,
                     feedback=bool(given.get("feedback")))
    packed = {name: value for name, value in resolve_runner_settings(given).items() if name not in UNPACKED_SETTINGS}
    generator = CascadeModel(*pair, **packed)
    with atomic_output(output, overwrite=overwrite, suffix=".keras", inputs=(model_a, model_b)) as temp:
        generator.save(temp)
    return generator


def export_generator(generator, directory, *, overwrite=False, safe_mode=True):
    """Loads a packed generator and writes it as a TensorFlow SavedModel: what `cascade export-model` does.

    Args:
        generator: the packed generator's `.keras` file (`cascade pack`).
        directory: the SavedModel folder to write (`keras_model.export_saved_model`).
        overwrite: whether a folder that holds files may be written over.
        safe_mode: how the generator loads (`keras_model.load_generator`).

    Returns:
        `(inputs, outputs)`: the names `serving_default` takes, `("inputs",)`
        with `max_steps` else `("inputs", "steps")`, and those it returns,
        e.g. `("flat_values", "lengths")`.

    Raises:
        ModelError: the file is not a packed generator, or does not load.
        DataError: `directory` is a file, or holds files without `overwrite`.
    """
    from cascade_cli.train.keras_model import CascadeModel, export_saved_model, load_generator

    loaded = load_generator(generator, safe_mode=safe_mode)
    settings = loaded.settings
    module = export_saved_model(CascadeModel(loaded.model_a, loaded.model_b, **settings), directory,
                                overwrite=overwrite)
    inputs = ("inputs",) if settings.get("max_steps") is not None else ("inputs", "steps")
    return inputs, tuple(module.serve.get_concrete_function().structured_outputs)  # traced by the export
