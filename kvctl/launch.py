"""`python -m kvctl.launch ENV_FILE -- ARGV...`: apply an env file, then exec ARGV.

supervisord starts every engine through this, so environment values reach the engine
byte for byte (supervisor's own `environment=` parser cannot carry every value).
The process is replaced by the engine: same PID, same process group.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3 or args[1] != "--":
        sys.exit("usage: python -m kvctl.launch ENV_FILE -- PROGRAM [ARGS...]")
    env_file, command = args[0], args[2:]
    try:
        with open(env_file, encoding="utf-8") as fh:
            extra = json.load(fh)["env"]
    except (OSError, ValueError, KeyError) as exc:
        sys.exit(f"kvctl.launch: cannot read {env_file}: {exc}")
    env = dict(os.environ)
    env.pop("KVCTL_ENV_DIGEST", None)
    env.update(extra)
    try:
        os.execve(command[0], command, env)
    except OSError as exc:
        sys.exit(f"kvctl.launch: cannot run {command[0]}: {exc}")


if __name__ == "__main__":
    main()
