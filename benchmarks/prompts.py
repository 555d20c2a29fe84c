"""Benchmark prompts: code snippets that end mid-code, cut from held-out standard-library files.

The default source is the list of held-out files in the demo pair's ``training_record.json`` (files the pair
never saw, tokenizer included). Without a record, fixed snippets of a few stdlib modules are used instead.
Each prompt is a few lines before a function definition, the definition and the first lines of its body,
cut in the middle of the next line, then trimmed to ``[MIN_TOKENS, MAX_TOKENS]`` tokens.
"""

from __future__ import annotations

import json
import re
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

MIN_TOKENS = 64
MAX_TOKENS = 200
TARGET_TOKENS = 120  # leading context is added line by line until the prompt reaches this many tokens
BODY_LINES = 3
# Character tables and near-empty modules say little about code completion speed.
SKIP_PREFIXES = ("encodings/",)
FALLBACK_FILES = (
    "textwrap.py", "json/encoder.py", "json/decoder.py", "argparse.py", "shlex.py", "fractions.py",
    "heapq.py", "bisect.py", "statistics.py", "string.py", "dataclasses.py", "pathlib.py", "copy.py",
    "csv.py", "difflib.py", "calendar.py",
)  # fmt: skip
DEF_LINE = re.compile(r"^\s*(async\s+)?def\s+\w+")

Encode = Callable[[str], list[int]]


@dataclass(frozen=True, slots=True)
class Prompt:
    source: str  # "<relative path>:<line of the def>"
    text: str
    token_ids: tuple[int, ...]


def heldout_files(record_path: Path) -> list[str]:
    """Relative stdlib paths listed as held out in a demo-pair training record."""
    record = json.loads(record_path.read_text(encoding="utf-8"))
    return list(record["data"]["heldout_files"])


def find_record(target_model: Path, shipped: Path) -> Path | None:
    """The training record next to the target model's directory, else the shipped pair's, else None."""
    for candidate in (target_model.parent / "training_record.json", shipped):
        if candidate.is_file():
            return candidate
    return None


def _read_stdlib(rel: str) -> str | None:
    path = Path(sysconfig.get_paths()["stdlib"]) / rel
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _def_lines(lines: Sequence[str]) -> list[int]:
    """Indices of `def` lines with BODY_LINES lines after them and then a line with code to cut."""
    found = []
    for i, line in enumerate(lines):
        cut_at = i + BODY_LINES + 1
        if DEF_LINE.match(line) and cut_at < len(lines) and len(lines[cut_at].strip()) >= 4:
            found.append(i)
    return found


def _cut_mid_line(line: str) -> str:
    """About the first half of a line (never only its indentation), at a word boundary if there is one."""
    content = line.rstrip("\n").rstrip()
    stripped = content.lstrip()
    indent = len(content) - len(stripped)
    half = indent + len(stripped) // 2
    space = content.rfind(" ", indent, half + 1)
    return content[:space] if space > indent else content[: max(half, indent + 1)]


def snippet(lines: Sequence[str], def_index: int, encode: Encode) -> tuple[str, list[int]] | None:
    """Lines before the def (up to TARGET_TOKENS tokens), the def, its first lines, half the next line."""
    end = def_index + BODY_LINES + 1
    tail = "".join(lines[def_index:end]) + _cut_mid_line(lines[end])
    start = def_index
    text = tail
    while start > 0:
        candidate = "".join(lines[start - 1 : def_index]) + tail
        if len(encode(candidate)) > TARGET_TOKENS:
            break
        start -= 1
        text = candidate
    ids = encode(text)
    if len(ids) > MAX_TOKENS:
        ids = ids[-MAX_TOKENS:]
    if len(ids) < MIN_TOKENS:
        return None
    return text, ids


def _file_prompts(rel: str, encode: Encode, per_file: int) -> list[Prompt]:
    text = _read_stdlib(rel)
    if text is None:
        return []
    lines = text.splitlines(keepends=True)
    defs = _def_lines(lines)
    prompts: list[Prompt] = []
    # Evenly spaced definitions, starting in the middle of the file.
    for j in range(per_file):
        if not defs:
            break
        index = defs[(len(defs) * (2 * j + 1)) // (2 * per_file) % len(defs)]
        made = snippet(lines, index, encode)
        if made is not None and all(p.source != f"{rel}:{index + 1}" for p in prompts):
            prompts.append(Prompt(f"{rel}:{index + 1}", made[0], tuple(made[1])))
    return prompts


def select_prompts(files: Sequence[str], encode: Encode, count: int) -> list[Prompt]:
    """`count` prompts spread evenly over the files; files give more than one prompt only when needed."""
    usable = [rel for rel in files if not rel.startswith(SKIP_PREFIXES)]
    for per_file in range(1, 9):
        by_file = [_file_prompts(rel, encode, per_file) for rel in usable]
        prompts = [ps[j] for j in range(per_file) for ps in by_file if j < len(ps)]
        if len(prompts) >= count:
            # Evenly spaced picks, so the prompts do not all come from the first files alphabetically.
            return [prompts[(i * len(prompts)) // count] for i in range(count)]
    raise ValueError(f"only {len(prompts)} prompts could be cut from {len(usable)} files, {count} asked")


def default_prompts(record: Path | None, encode: Encode, count: int) -> tuple[list[Prompt], str]:
    """(prompts, a description of where they came from)."""
    if record is not None:
        files = heldout_files(record)
        return select_prompts(files, encode, count), f"held-out files of {record}"
    return select_prompts(FALLBACK_FILES, encode, count), "fixed stdlib snippets (no training record found)"
