"""Where lmstack's own config groups lie: conf/ inside the package.

In a clone `src/lmstack/conf` links to the repository's top-level conf/ (and conf/recipe to
recipes/); a wheel carries copies of both as package data, so an installed lmstack composes
the same configs from any directory.
"""

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
RECIPE_DIR = CONF_DIR / "recipe"
PROMPT_DIR = CONF_DIR / "prompt"
