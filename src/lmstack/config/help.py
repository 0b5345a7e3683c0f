"""`python run.py --help`: every config group, its options and what each is for.

Read straight from conf/ (each option's YAML opens with a comment saying what it is
for), so it answers in well under a second. Hydra's own --help deep-copies its whole
config repository once per group option it lists (~150 copies here: 5-10 s on a busy
CPU); `python run.py --hydra-help` still shows Hydra's flags.
"""

from __future__ import annotations

from pathlib import Path

HELP_FLAGS = ("--help", "-h")
USAGE = """\
usage: lmstack [group=option ...] [key=value ...] [-m]      (in a clone: python run.py ...)

  -m                  a sweep: comma-separated values become grid points
  --cfg job           print the composed config and exit
  --hydra-help        Hydra's own flags
  recipe=NAME|PATH    an overlay of groups and keys (recipes/ or any file)
  --config-dir DIR    your own groups, options and recipes (DIR/model/x.yaml: model=x)
"""


def wants_help(argv: list[str]) -> bool:
    return len(argv) == 2 and argv[1] in HELP_FLAGS


def render_help(conf_dir: Path) -> str:
    lines = [USAGE, "config groups (option: what it is for):"]
    for group in sorted(p for p in conf_dir.iterdir() if p.is_dir() and p.name != "hydra"):
        lines.append(f"\n  {group.name}=")
        lines += _options(group)
    for group in sorted(p for p in (conf_dir / "hydra").iterdir() if p.is_dir()):
        if group.name in ("launcher", "sweeper"):
            lines.append(f"\n  hydra/{group.name}=  (plus Hydra's basic)")
            lines += _options(group)
    return "\n".join(lines) + "\n"


def _options(group: Path) -> list[str]:
    options = sorted(group.glob("*.yaml"))
    width = max((len(p.stem) for p in options), default=0)
    return [f"    {p.stem:<{width}}  {_purpose(p)}" for p in options]


def _purpose(path: Path) -> str:
    """The first sentence of an option's opening comment (after any `# @package` line)."""
    comment = []
    for line in path.read_text().splitlines():
        text = line.strip()
        if not text.startswith("#"):
            break
        if not text.startswith("# @package"):
            comment.append(text.lstrip("#").strip())
    sentence = " ".join(comment).split(". ")[0].split("  ")[0]
    return sentence if len(sentence) <= 110 else sentence[:107] + "..."
