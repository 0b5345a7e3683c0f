"""The command line as Hydra's parser will take it.

Hydra reads its overrides as one argparse positional list, so ``-m`` between two overrides
(``python run.py objective=dpo -m hydra.sweep.dir=x``) splits that list and argparse stops
with "unrecognized arguments". Moving the flag to the front gives the same command in the
one order Hydra's parser accepts everywhere.
"""

from __future__ import annotations

MULTIRUN_FLAGS = ("-m", "--multirun")
# Hydra's flags that take the next word as their value: a "-m" right after one is that value
FLAGS_WITH_A_VALUE = (
    "-cp",
    "--config-path",
    "-cn",
    "--config-name",
    "-cd",
    "--config-dir",
    "-p",
    "--package",
    "--experimental-rerun",
)


def multirun_flag_first(argv: list[str]) -> list[str]:
    """argv with a ``-m``/``--multirun`` given anywhere moved to just after the program name."""
    program, words = argv[:1], argv[1:]
    flags = [
        index
        for index, word in enumerate(words)
        if word in MULTIRUN_FLAGS and (index == 0 or words[index - 1] not in FLAGS_WITH_A_VALUE)
    ]
    if not flags:
        return argv
    rest = [word for index, word in enumerate(words) if index not in flags]
    return [*program, words[flags[0]], *rest]
