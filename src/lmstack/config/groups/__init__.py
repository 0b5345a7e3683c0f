"""One module per config group: the schema its YAML files (conf/<group>/) are checked against.

Each group's YAML opens with `defaults: [schema, _self_]` (or `NAME_schema` where each option
has its own schema: objective, serving), so Hydra merges it onto the dataclass here: an
unknown key or a value of the wrong type fails at composition, naming the key. Cross-field
rules live in `__post_init__`, which runs when `launch.validate` turns the composed config
into these objects. The root that holds them all is config/schema.py's `Config`.

These modules stay light (no torch, no transformers): they are imported before
composition, and config errors must answer in about a second.
"""
