"""The fleet's Lua scripts, one ``.lua`` file each under ``orchestrator/lua``.

Each file starts with a header naming its KEYS and ARGV. Every key a script touches is passed in KEYS (no key
name is built inside Lua), so the scripts stay ready for Valkey Cluster hash tags. redis-py's ``Script`` runs
them with EVALSHA and reloads one that the server lost (a restart, a promoted replica).
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import redis
from redis.commands.core import Script

LUA_DIR = Path(__file__).parent / "lua"


_INCLUDE = re.compile(r"^--#include (\w+)$", re.M)


@cache
def source(name: str) -> str:
    """The text of ``lua/<name>.lua``, with each ``--#include x`` line replaced by ``lua/_x.lua``."""
    text = (LUA_DIR / f"{name}.lua").read_text(encoding="utf-8")
    return _INCLUDE.sub(lambda m: (LUA_DIR / f"_{m.group(1)}.lua").read_text(encoding="utf-8").rstrip("\n"), text)


def load(r: redis.Redis, name: str) -> Script:
    """A callable script bound to a client."""
    return r.register_script(source(name))


def call(script: Script, keys: list[str], args: list[Any]) -> Any:
    """Run a script (a thin wrapper so every call site reads the same)."""
    return script(keys=keys, args=args)
