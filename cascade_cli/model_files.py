"""Model files: load a saved `.keras` model safely, and a pair of them checked (`run.models.check_pair`).

Everything is refused on load, before any work: a remote path, a file that is
not a regular `.keras` archive or whose JSON members are too large to read, a
training run's model file whose pair is not complete (`train.checkpoints`),
code that safe mode refuses, and a pair that does not fit together. The
engine (`cascade_cli.run`) takes loaded models; this module reads the files.
"""

from __future__ import annotations

import os
import stat
import tempfile
import zipfile
from pathlib import Path

from cascade_cli.errors import ModelError
from cascade_cli.run.models import check_pair

# Keras reads an archive's `config.json` and `metadata.json` whole into memory:
# refuse one that declares more than this (a saved model's config is kilobytes).
ARCHIVE_JSON_LIMIT = 64 * 2**20
_ARCHIVE_JSON = ("config.json", "metadata.json")


def load_model(path, *, role="model", safe_mode=True, allow_legacy_h5=False):
    """Loads a local `.keras` file without compiling it.

    Suffixes are matched case-insensitively (`model.KERAS`, `legacy.H5`).

    Args:
        path: the file to load.
        role: how to name the file in messages, e.g. `"model A"`.
        safe_mode: refuse to deserialize code (`Lambda` layers); Keras' own flag.
        allow_legacy_h5: also accept legacy Keras `.h5` model files.

    Returns:
        The `keras.Model`.

    Raises:
        ModelError: the path is remote, missing, a directory or another
            non-regular file (a FIFO would hang the read), not a `.keras`
            archive, an archive whose `config.json` or `metadata.json` declares
            more than `ARCHIVE_JSON_LIMIT` bytes, or Keras cannot rebuild the
            model from it.
    """
    text = str(path)
    if "://" in text:  # hf://, gs://, s3://, https://, ...
        raise ModelError(
            f"{role} '{text}' is a remote path; only local .keras files are loaded. "
            "Download it first."
        )
    path = Path(text)
    if not path.exists():
        raise ModelError(f"{role} '{path}' does not exist; expected a .keras file.")
    if path.is_dir():
        kind = "a TensorFlow SavedModel directory" if (path / "saved_model.pb").exists() else "a directory"
        raise ModelError(
            f"{role} '{path}' is {kind}; only local .keras files are loaded "
            "(save the model with model.save('name.keras'))."
        )
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would block or never end
        raise ModelError(f"{role} '{path}' is not a regular file (a pipe or device?); expected a .keras file.")
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        if not allow_legacy_h5:
            raise ModelError(
                f"{role} '{path}' is a legacy .h5 model; only local .keras files are loaded "
                "by default. Pass allow_legacy_h5=True to load it anyway."
            )
    elif suffix != ".keras":
        raise ModelError(f"{role} '{path}' has suffix '{path.suffix}'; expected a .keras file.")
    else:
        _check_archive(path, role=role)

    import keras

    from cascade_cli.train.checkpoints import check_trained_model

    check_trained_model(path)  # a training run's model_a/model_b: only a pair written as one
    try:
        if path.suffix == suffix:
            model = keras.saving.load_model(path, compile=False, safe_mode=safe_mode)
        else:  # Keras picks the format by a lower-case suffix: load through a link that has one
            with tempfile.TemporaryDirectory(prefix="cascade-model-") as folder:
                link = Path(folder) / f"model{suffix}"
                link.symlink_to(path.resolve())
                model = keras.saving.load_model(link, compile=False, safe_mode=safe_mode)
    except Exception as error:  # Keras raises many types; every one means "cannot load".
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if safe_mode and ("safe_mode" in str(error) or "Lambda" in str(error)):
            raise ModelError(
                f"{role} '{path}' contains code (a Lambda layer or similar) and safe mode refused "
                "to load it. Pass safe_mode=False only if you trust where the file came from."
            ) from error
        raise ModelError(f"could not load {role} '{path}': {message}") from error
    if not isinstance(model, keras.Model):
        raise ModelError(f"{role} '{path}' holds a {type(model).__name__}, expected a keras.Model.")
    return model


def load_pair(path_a, path_b, *, safe_mode=True, allow_legacy_h5=False, feedback=False):
    """Loads model A and model B with `load_model` and checks them with `check_pair`, naming the files.

    Args:
        path_a: model A's file.
        path_b: model B's file.
        safe_mode: as for `load_model`.
        allow_legacy_h5: as for `load_model`.
        feedback: check B in feedback form (`check_pair`).

    Returns:
        `(model_a, model_b)`.

    Raises:
        ModelError: from `load_model` or `check_pair`, naming the file.
    """
    models = [load_model(path, role=role, safe_mode=safe_mode, allow_legacy_h5=allow_legacy_h5)
              for path, role in ((path_a, "model A"), (path_b, "model B"))]
    check_pair(*models, names=(str(path_a), str(path_b)), feedback=feedback)
    return tuple(models)


def _check_archive(path, *, role):
    """Refuses a `.keras` that is not a zip, or whose JSON members declare more than `ARCHIVE_JSON_LIMIT`.

    Only the zip's directory is read: a 1 GiB `config.json` packed into 1 MB
    is refused before anything is decompressed.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        members = None
    if members is None:
        raise ModelError(
            f"{role} '{path}' is not a valid .keras file (not a zip archive; truncated or corrupt?)."
        )
    for member in members:
        if member.filename in _ARCHIVE_JSON and member.file_size > ARCHIVE_JSON_LIMIT:
            raise ModelError(
                f"{role} '{path}' declares a {member.filename} of {member.file_size:,} bytes, over the "
                f"{ARCHIVE_JSON_LIMIT:,} bytes a model's description may take; the file is not a "
                "saved model (or is corrupt)."
            )
