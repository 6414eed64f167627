"""Slurm host lists (``SLURM_JOB_NODELIST``): the project's one parser, and a tiny CLI for shells.

Owns: expanding a Slurm hostlist expression with Slurm's semantics, as ``scontrol show
hostnames`` does: comma-separated (or whitespace-separated) entries at the top level; in each
entry every bracket group ``[1-3,7]`` expands to its ranges and single numbers, zero padding kept
(the width of a range's first number); several groups in one entry give the cartesian product,
leftmost group slowest (``a[1-2]-ib[3-4]`` -> a1-ib3, a1-ib4, a2-ib3, a2-ib4).
Does not own: asking Slurm (``launch/slurm/lib.sh`` prefers ``scontrol`` and calls this module
only when it is missing) or choosing the rendezvous port (:mod:`dist_train.distributed`).

Standard library only, so a shell can run it with any Python 3.10+::

    python -m dist_train.slurm_hosts first "gpu[03-05,07],cpu1"    # -> gpu03
    python -m dist_train.slurm_hosts expand "a[1-2]-ib[3-4]"       # one host a line
"""

from __future__ import annotations

import itertools
import re
import sys
from collections.abc import Iterator

_ITEM = re.compile(r"(\d+)(?:-(\d+))?")


def _numbers(group: str, nodelist: str) -> list[str]:
    """``"001-003,7"`` -> ``["001", "002", "003", "7"]``."""
    out = []
    for item in group.split(","):
        m = _ITEM.fullmatch(item.strip())
        if m is None:
            raise ValueError(_error(nodelist, f"bad range {item!r} in [{group}]"))
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(_error(nodelist, f"descending range {item!r}"))
        out.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return out


def _error(nodelist: str, why: str) -> str:
    return f"cannot parse the Slurm node list {nodelist!r}: {why}"


def _top_level(nodelist: str) -> list[str]:
    """Splits at commas and whitespace outside brackets; an empty comma item is an error."""
    words: list[str] = []
    depth, word, seen = 0, "", False  # seen: a word since the last top-level comma
    for c in nodelist + ",":
        if c == "[":
            if depth:
                raise ValueError(_error(nodelist, "nested '['"))
            depth = 1
        elif c == "]":
            if not depth:
                raise ValueError(_error(nodelist, "']' without '['"))
            depth = 0
        if depth or not (c == "," or c.isspace()):
            word += c
            continue
        if word:
            words.append(word)
            word, seen = "", True
        if c == ",":
            if not seen:
                raise ValueError(_error(nodelist, "empty host name"))
            seen = False
    if depth:
        raise ValueError(_error(nodelist, "'[' without ']'"))
    return words


def _parts(entry: str, nodelist: str) -> list[list[str]]:
    """``"a[1-2]-ib[3-4]"`` -> ``[["a"], ["1", "2"], ["-ib"], ["3", "4"]]``."""
    parts = []
    for m in re.finditer(r"([^\[]*)(?:\[([^\]]*)\])?", entry):
        if m.group(1):
            parts.append([m.group(1)])
        if m.group(2) is not None:
            parts.append(_numbers(m.group(2), nodelist))
    return parts


def iter_nodelist(nodelist: str) -> Iterator[str]:
    """Host names of a Slurm node list, in Slurm's order; the whole list is checked first.

    Raises:
        ValueError: one line naming the list, for a malformed or empty list.
    """
    entries = [_parts(entry, nodelist) for entry in _top_level(nodelist)]
    for parts in entries:
        for combo in itertools.product(*parts):
            yield "".join(combo)


def expand_nodelist(nodelist: str) -> list[str]:
    """Every host name: ``"node[001-003,7]"`` -> node001, node002, node003, node7."""
    return list(iter_nodelist(nodelist))


def first_host(nodelist: str) -> str:
    """First host name of a node list (the rendezvous host): ``"gpu[03-05,07],cpu1"`` -> gpu03."""
    return next(iter_nodelist(nodelist))


def main(argv: list[str] | None = None) -> int:
    """``first LIST`` prints the first host; ``expand LIST`` prints every host, one a line."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("first", "expand"):
        print("usage: python -m dist_train.slurm_hosts {first|expand} NODELIST", file=sys.stderr)
        return 2
    try:
        hosts = [first_host(args[1])] if args[0] == "first" else expand_nodelist(args[1])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("\n".join(hosts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
