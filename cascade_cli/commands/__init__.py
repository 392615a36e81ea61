"""One module per `cascade` command: each parses its flags, calls one library function and renders the result.

`cli.COMMANDS` names each command's module; the group imports it when the
command runs or `--help` lists it. A command imports `cascade_cli.cli` (the
shared options and the edge) and the library, never another command, and
nothing at import time that loads TensorFlow or h5py.
"""
