"""The OpenAI API's request schema, checked before a completion request reaches an engine.

A body the engine cannot parse (`messages: "hi"`) or whose values are out of range
(`temperature: -1`) is answered with a 400 naming the field, as vLLM and OpenAI answer it,
rather than a 500 from the engine or a silent 200. The types are the openai package's own
request TypedDicts, validated by pydantic; what they do not carry (ranges, lists that must
not be empty, a field that needs another) is in small tables below.

What the engines accept beyond OpenAI passes: unknown keys (vLLM's `top_k`, `ignore_eos`,
lmstack's own), and variants OpenAI does not define, such as a custom message role
(Llama's "ipython") or vLLM's video content parts, which vLLM takes as long as they name
their role or type. Validation only reads the body: what is forwarded is the client's body.

Deferred imports, for start-up time: pydantic and the openai types are imported, and the
validators built, on the first request or at `warm_up()` (0.7 s, most of it importing openai;
then a few microseconds a request).
"""

from __future__ import annotations

import functools
import operator
import threading
import types
from typing import Any

# Ranges from the OpenAI API reference (https://platform.openai.com/docs/api-reference/chat/
# create and .../completions/create), each also what vLLM (0.32) rejects outside it:
# (min, min excluded, max), None unbounded. Limits an engine's operator can change are the
# engine's to check: top_logprobs and logprobs up to vLLM's --max-logprobs (20 by default,
# OpenAI's 20 and 5), at most VLLM_MAX_STOP_STRINGS stop strings (4 by default, as OpenAI;
# for the hf engine the gateway trims any number, and lm-eval sends a task's every one).
# logit_bias is not bounded: vLLM clamps a bias to -100..100 where OpenAI refuses it.
RANGES: dict[str, tuple[float | None, bool, float | None]] = {
    "temperature": (0, False, 2),
    "top_p": (0, True, 1),
    "presence_penalty": (-2, False, 2),
    "frequency_penalty": (-2, False, 2),
    "n": (1, False, None),
    "max_tokens": (1, False, None),
    "max_completion_tokens": (1, False, None),
    "top_logprobs": (0, False, None),
    "logprobs": (0, False, None),  # completions' count (chat's is a bool)
    "seed": (-(2**63), False, 2**63 - 1),  # vLLM: a 64-bit integer
}
# lists OpenAI and vLLM both refuse empty ("Cannot apply chat template to an empty conversation")
NON_EMPTY = ("messages", "tools")
# a field OpenAI and vLLM both refuse without another one set
NEEDS = {"stream_options": "stream", "top_logprobs": "logprobs"}
# a variant an open union does not know: its tag is all that is checked (see `_tagged`)
OTHER_VARIANT = "another variant"
ENDPOINT_PARAMS = {
    "chat": "openai.types.chat.completion_create_params",
    "completions": "openai.types.completion_create_params",
}


def schema_problem(body: dict[str, Any], endpoint: str) -> tuple[str, str] | None:
    """(field, message) for the first thing in `body` the API's schema rejects, else None.
    The field is the top-level key (the 400's `param`); the message names the full path."""
    from pydantic import ValidationError

    try:  # strict: "10" is no max_tokens (OpenAI refuses it; vLLM's lax pydantic reads 10)
        _validator(endpoint).validate_python(body, strict=True)
    except ValidationError as error:
        return _first_problem(error.errors(include_url=False), body)
    return _missing_partner(body)


def _missing_partner(body: dict[str, Any]) -> tuple[str, str] | None:
    """A field set without the one it needs (NEEDS), as (field, message)."""
    for name, needed in NEEDS.items():
        if body.get(name) and not body.get(needed):
            return name, f"{name} is only allowed with {needed}: true."
    return None


def warm_up() -> None:
    """Build the validators now (a gateway's start), not on its first request."""
    for endpoint in ENDPOINT_PARAMS:
        _validator(endpoint)


def _validator(endpoint: str) -> Any:
    """The endpoint's request TypedDict as a pydantic validator (built once: ~30 ms). One
    thread builds at a time: the gateway's warm-up thread and a first request importing
    openai's mutually importing modules together fail with "partially initialized module"."""
    with _BUILDING:
        return _build_validator(endpoint)


_BUILDING = threading.Lock()


@functools.cache
def _build_validator(endpoint: str) -> Any:
    import importlib

    from pydantic import TypeAdapter

    params = importlib.import_module(ENDPOINT_PARAMS[endpoint]).CompletionCreateParamsBase
    return TypeAdapter(_request_type(params, endpoint))


def _request_type(params: type, endpoint: str) -> type:
    """The openai TypedDict with lists for its iterables, vLLM's wider fields, and ranges."""
    from typing import get_type_hints

    from typing_extensions import TypedDict

    fields = {
        name: _as_lists(tp) for name, tp in get_type_hints(params, include_extras=True).items()
    }
    fields |= _vllm_fields(endpoint)
    for name, bounds in RANGES.items():
        if name in fields:
            fields[name] = _bounded(fields[name], bounds)
    for name in NON_EMPTY:
        if name in fields:
            fields[name] = _non_empty(fields[name])
    return TypedDict(params.__name__, {k: _nullable(tp) for k, tp in fields.items()}, total=False)


def _vllm_fields(endpoint: str) -> dict[str, Any]:
    """Fields whose type vLLM widens (or that only the streaming variants of the types
    carry), all of them optional."""
    fields = {
        "model": str,  # optional: the gateway names the served model
        "stream": bool,
        "logit_bias": dict[str, float],  # vLLM takes float biases
        "stop": str | list[str],
    }
    if endpoint == "completions":
        # optional: vLLM takes `prompt_embeds` instead. The openai type's members with token
        # ids first: a branch that fails costs an error per item (4,000 ids: 600 µs, not 40)
        fields["prompt"] = str | list[int] | list[list[int]] | list[str]
    return fields


# ---------------------------------------------------------------- rewriting the types


def _as_lists(tp: Any) -> Any:
    """`tp` with lists for its Iterables (pydantic checks an Iterable only as it is consumed,
    and takes a string for one), and open tagged unions (`_tagged`) for unions of variants."""
    import collections.abc
    from typing import Literal, Required, get_args, get_origin

    from typing_extensions import is_typeddict

    if is_typeddict(tp):
        return _typeddict_as_lists(tp)
    origin, args = get_origin(tp), get_args(tp)
    if origin is None or origin is Literal:
        return tp
    if origin in (collections.abc.Iterable, collections.abc.Sequence):
        return list[_as_lists(args[0])]
    if _is_union(origin):
        return _tagged([_as_lists(arg) for arg in args])
    if origin is Required:
        return Required[_as_lists(args[0])]
    return origin[tuple(_as_lists(arg) for arg in args)]  # dict, list


@functools.cache
def _typeddict_as_lists(td: type) -> type:
    from typing import get_type_hints

    from typing_extensions import TypedDict

    fields = {name: _as_lists(tp) for name, tp in get_type_hints(td, include_extras=True).items()}
    return TypedDict(td.__name__, fields, total=td.__total__)


def _tagged(members: list[Any]) -> Any:
    """A union of TypedDicts told apart by a literal key (a message's `role`, a part's `type`)
    as a tagged union: an error names the variant's own field, not every variant's. A tag no
    variant has passes as another variant (vLLM's custom roles and parts); a missing one is
    the tag's "Field required"."""
    from typing import Annotated, Required

    from pydantic import Discriminator, Tag
    from typing_extensions import TypedDict

    variants = [m for m in members if _literal_tags(m)]
    key = _shared_tag_key(variants)
    if key is None:
        return _union(members)
    by_tag = {tag: v.__name__ for v in variants for tag in _literal_tags(v)[key]}
    other = TypedDict(OTHER_VARIANT, {key: Required[str]})

    def variant(value: Any) -> str:
        tag = value.get(key) if isinstance(value, dict) else None
        return by_tag.get(tag, OTHER_VARIANT) if isinstance(tag, str) else OTHER_VARIANT

    tagged = [Annotated[v, Tag(v.__name__)] for v in variants]
    union = Annotated[
        _union([*tagged, Annotated[other, Tag(OTHER_VARIANT)]]), Discriminator(variant)
    ]
    return _union([union, *(m for m in members if m not in variants)])


def _union(members: list[Any]) -> Any:
    """The union of types listed at run time."""
    return functools.reduce(operator.or_, members)


def _is_union(origin: Any) -> bool:
    from typing import Union

    return origin is Union or origin is types.UnionType


def _literal_tags(tp: Any) -> dict[str, tuple]:
    """A TypedDict's required literal fields: {key: its values}; {} for other types."""
    from typing import Literal, Required, get_args, get_origin

    from typing_extensions import is_typeddict

    if not is_typeddict(tp):
        return {}
    tags = {}
    for key, hint in tp.__annotations__.items():
        if get_origin(hint) is Required and get_origin(get_args(hint)[0]) is Literal:
            tags[key] = get_args(get_args(hint)[0])
    return tags


def _shared_tag_key(variants: list[Any]) -> str | None:
    """The literal key every variant has, with no value shared by two of them."""
    if len(variants) < 2:
        return None
    keys = set.intersection(*(set(_literal_tags(v)) for v in variants))
    for key in sorted(keys):
        values = [tag for v in variants for tag in _literal_tags(v)[key]]
        if len(values) == len(set(values)):
            return key
    return None


def _bounded(tp: Any, bounds: tuple[float | None, bool, float | None]) -> Any:
    """`tp` with its numbers (int or float, not bool) held within bounds."""
    from typing import Annotated, get_args, get_origin

    from annotated_types import Interval

    if _is_union(get_origin(tp)):
        return _union([_bounded(arg, bounds) for arg in get_args(tp)])
    if tp not in (int, float):
        return tp
    low, low_excluded, high = bounds
    interval = Interval(gt=low, le=high) if low_excluded else Interval(ge=low, le=high)
    return Annotated[tp, interval]


def _nullable(tp: Any) -> Any:
    """An optional field may be null, as vLLM takes it ("tools": null from LangChain's
    clients), where the types leave some out (the SDK never sends null)."""
    from typing import Required, get_origin

    return tp if get_origin(tp) is Required else tp | None


def _non_empty(tp: Any) -> Any:
    """`tp` with its lists holding at least one item."""
    from typing import Annotated, Required, get_args, get_origin

    from annotated_types import MinLen

    if get_origin(tp) is Required:
        return Required[_non_empty(get_args(tp)[0])]
    if _is_union(get_origin(tp)):
        return _union([_non_empty(arg) for arg in get_args(tp)])
    return Annotated[tp, MinLen(1)] if get_origin(tp) is list else tp


# ---------------------------------------------------------------- the message


def _first_problem(errors: list[dict[str, Any]], body: dict[str, Any]) -> tuple[str, str]:
    """The error deepest in the body (the union branch that got furthest: a content part's
    own field rather than "not a string"), preferring a wrong value to a wrong type; where
    each branch only had the wrong type, what they wanted ("a valid string or a valid list")."""
    located = [(_body_path(error, body), error) for error in errors]
    path, first = max(located, key=lambda pair: (len(pair[0]), not _wrong_type(pair[1])))
    wanted = [first["msg"]]
    if _wrong_type(first):
        for where, error in located:
            if where == path and _wrong_type(error) and error["msg"] not in wanted:
                wanted.append(error["msg"])
    return str(path[0]), _message(_dotted(path), first, wanted)


def _wrong_type(error: dict[str, Any]) -> bool:
    return error["type"].endswith("_type")


def _body_path(error: dict[str, Any], body: Any) -> tuple:
    """The error's location as keys and indexes into the body, without pydantic's union
    branch names (a step the body does not hold there), and with the missing key."""
    path, value = [], body
    for step in error["loc"]:
        if _holds(value, step):
            value = value[step]
            path.append(step)
    if error["type"] == "missing":
        path.append(error["loc"][-1])
    return tuple(path) or ("body",)


def _holds(value: Any, step: str | int) -> bool:
    if isinstance(value, dict):
        return step in value
    return isinstance(value, list) and isinstance(step, int) and 0 <= step < len(value)


def _dotted(path: tuple) -> str:
    text = str(path[0])
    for step in path[1:]:
        text += f"[{step}]" if isinstance(step, int) else f".{step}"
    return text


def _message(path: str, error: dict[str, Any], wanted: list[str]) -> str:
    """What was wrong, briefly: a range worded as the gateway's other checks word it, else
    pydantic's message(s) and the value sent."""
    bound = error.get("ctx") or {}
    for kind, words in (("ge", "at least"), ("gt", "greater than"), ("le", "at most")):
        if kind in bound and error["type"].startswith(("greater", "less")):
            return f"{path} must be {words} {_number(bound[kind])}, got {error['input']!r}."
    if error["type"] == "missing":
        return f"{path} is required."
    if error["type"] == "too_short":
        return f"{path} must not be empty."
    wanted = " or ".join(_lowered(msg, i) for i, msg in enumerate(wanted))
    return f"{path}: {wanted}, got {_short(error['input'])}."


def _number(value: float) -> float | int:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _lowered(msg: str, index: int) -> str:
    """'Input should be a valid list' the second time is 'a valid list'."""
    return msg.removeprefix("Input should be ") if index else msg


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
