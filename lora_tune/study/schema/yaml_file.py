"""The study file as text: :func:`read_spec_text` (bounded: size, file kind) and :func:`load_yaml`
(``yaml.safe_load`` that refuses duplicate keys and aliases that expand past the bounds), each
problem a :class:`~lora_tune.errors.StudySpecError` naming the file and the line."""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from lora_tune.errors import StudySpecError, clip, short

# bounds far above any real study file (a few KB); the YAML ones count values and characters
# with every alias written out, so that a "billion laughs" is refused before it is built
MAX_SPEC_BYTES = 1 << 20
MAX_YAML_VALUES = 250_000
MAX_YAML_CHARS = 2 * MAX_SPEC_BYTES
MAX_YAML_DEPTH = 100  # levels of nesting (a study file has about 5)


def read_spec_text(path: str | Path) -> str:
    """A study file's text: a readable regular file of at most MAX_SPEC_BYTES."""
    path = Path(path)

    def refuse(message: str) -> StudySpecError:
        return StudySpecError([("(file)", message)], source=str(path))

    shown = short(str(path))
    try:  # stat before opening: opening a FIFO would wait for a writer for ever
        info = os.stat(path)
    except FileNotFoundError:
        raise refuse(f"no such file: {shown}") from None
    except (OSError, ValueError) as exc:
        raise refuse(f"cannot read {shown}: {exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise refuse(f"{shown} is a directory, not a study file")
    if not stat.S_ISREG(info.st_mode):
        raise refuse(f"{shown} is not a regular file ({_file_kind(info.st_mode)}); give a YAML study file")
    if info.st_size > MAX_SPEC_BYTES:
        raise refuse(f"{shown} is {info.st_size:,} bytes; a study file may be at most {MAX_SPEC_BYTES:,} bytes (1 MiB)")
    try:
        # O_NONBLOCK: should the path have become a FIFO since the stat, opening it does not wait
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise refuse(f"{shown} is not a regular file; give a YAML study file")
            data = fh.read(MAX_SPEC_BYTES + 1)
    except StudySpecError:
        raise
    except OSError as exc:
        raise refuse(f"cannot read {shown}: {exc}") from None
    if len(data) > MAX_SPEC_BYTES:
        raise refuse(f"{shown} is over {MAX_SPEC_BYTES:,} bytes; a study file may be at most 1 MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise refuse(f"cannot read {shown}: not UTF-8 text (line {line}: {exc.reason})") from None


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a plain file"


def load_yaml(text: str, source: str | None = None) -> Any:
    """``yaml.safe_load`` within the bounds above (see :class:`_UniqueKeyLoader`); StudySpecError with the line."""
    if len(text) > MAX_SPEC_BYTES:
        raise StudySpecError([("(file)", f"the text is {len(text):,} characters; a study file may be at most "
                                         f"{MAX_SPEC_BYTES:,} (1 MiB)")], source=source)
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "(file)"
        problem = clip(getattr(exc, "problem", None) or str(exc), 300)
        message = problem if isinstance(exc, _TooLargeError) else f"not valid YAML: {problem}"
        raise StudySpecError([(where, message)], source=source) from None
    except RecursionError:
        raise StudySpecError([("(file)", "the YAML is nested too deeply (hundreds of levels); a study file needs a "
                                         "few")], source=source) from None


class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser when installed
    """``yaml.safe_load``, except that a key given twice, aliases expanding past the bounds and a
    scalar Python cannot build (``2021-13-45``) are YAML errors at their line."""

    def get_single_node(self):
        node = super().get_single_node()
        _check_expansion(node)
        return node

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError, TypeError) as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this value: {clip(str(exc), 200)}", node.start_mark) from None

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: merged by SafeLoader below
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a plain value, got {short(key)}", key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {short(key)}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _TooLargeError(yaml.constructor.ConstructorError):
    """Valid YAML, but over a bound of lora-tune (aliases that expand too far, nesting too deep)."""


def _check_expansion(root: yaml.Node | None) -> None:
    """Refuse a node graph over the bounds with aliases written out, or endless; each node is
    visited once, so this takes time in the size of the text, not of the expansion."""
    if root is None:
        return
    sizes: dict[int, tuple[int, int, int]] = {}  # id(node) -> (values, characters, levels) written out
    open_nodes: set[int] = set()  # the nodes on the path from the root (an alias to one: endless)
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        if isinstance(node, yaml.ScalarNode):
            sizes[key] = (1, len(node.value), 0)
            continue
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else node.value
        if done:
            open_nodes.discard(key)
            values = 1 + sum(sizes[id(child)][0] for child in children)
            chars = sum(sizes[id(child)][1] for child in children)
            levels = 1 + max((sizes[id(child)][2] for child in children), default=0)
            if levels > MAX_YAML_DEPTH:
                raise _TooLargeError(None, None, f"values are nested more than {MAX_YAML_DEPTH} levels deep here "
                                     f"(aliases written out); a study file may nest at most {MAX_YAML_DEPTH}",
                                     node.start_mark)
            if values > MAX_YAML_VALUES or chars > MAX_YAML_CHARS:
                what = f"{MAX_YAML_VALUES:,} values" if values > MAX_YAML_VALUES else f"{MAX_YAML_CHARS:,} characters"
                raise _TooLargeError(
                    None, None, f"this holds more than {what} once its aliases are written out; a study file may "
                    f"hold at most {MAX_YAML_VALUES:,} values and {MAX_YAML_CHARS:,} characters (aliases that "
                    "multiply a file, a 'billion laughs', are refused)", node.start_mark)
            sizes[key] = (values, chars, levels)
            continue
        open_nodes.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in open_nodes:
                raise _TooLargeError(
                    None, None, "an alias refers to the value that contains it (an endless value)", child.start_mark)
            if id(child) not in sizes:
                stack.append((child, False))
