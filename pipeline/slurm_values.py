"""What a `slurm.*` value may be, for every path that writes it into a batch script: `scratchgpt submit`'s
templates (pipeline.slurm.render) and datatrove's Slurm executor (pipeline.core.executors.run_slurm).

The config schema (pipeline.config.SlurmConfig) applies these checks when the config loads, so a bad value
stops before anything is written or submitted. Each function returns what is wrong, or None; the callers
turn that into their own error. This module imports nothing of the project, so both can use it.

`slurm.extra_sbatch` options are read the way sbatch's getopt_long reads them: a long option may be any
unambiguous prefix (`--dep=` is `--dependency=`), and short options may be bundled (`-HJname` is `--hold
--job-name=name`). The options the project sets itself are refused in every spelling.
"""

from __future__ import annotations

import re
import shutil
import subprocess

# What an #SBATCH value may be: one token, no whitespace, quotes, `$`, backquote, `;`, `&`, `|`, `#`,
# redirections or `%` (Slurm expands %-patterns in some options).
TOKEN = r"[A-Za-z0-9_.,:+=/@-]+"
PATTERNS: dict[str, tuple[str, str]] = {
    "partition": (r"[A-Za-z0-9_.,-]+", "partition names separated by commas"),
    "account": (r"[A-Za-z0-9_.-]+", "an account name"),
    "time": (r"(?:\d+-)?\d+(?::\d+){0,2}|\d+-\d+|UNLIMITED|INFINITE|unlimited|infinite",
             "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"),
    "mem": (r"\d+[KMGT]?B?", "a size such as 16G or 4000M"),
    "network_interface": (r"[A-Za-z0-9_.:-]+(?:,[A-Za-z0-9_.:-]+)*", "interface names separated by commas"),
}
_LONG = re.compile(r"--([a-z][a-z0-9-]*)(?:=(" + TOKEN + r"))?")
_SHORT = re.compile(r"-([A-Za-z])(" + TOKEN + r")?")

# Options the scripts set themselves (or that would replace the script): refused in extra_sbatch.
OWNED = frozenset({"wrap", "output", "error", "job-name", "chdir", "workdir", "dependency", "kill-on-invalid-dep",
                   "array", "nodes", "ntasks", "ntasks-per-node", "signal", "requeue", "no-requeue", "open-mode",
                   "parsable", "export-file"})
# sbatch's long options (Slurm 22-24), so that a prefix resolves as sbatch resolves it.
SBATCH_LONG = frozenset("""
account acctg-freq array batch bb bbf begin chdir cluster-constraint clusters comment constraint container
container-id contiguous core-spec cores-per-socket cpu-freq cpus-per-gpu cpus-per-task deadline delay-boot
dependency distribution error exclude exclusive export export-file extra extra-node-info get-user-env gid
gpu-bind gpu-freq gpus gpus-per-node gpus-per-socket gpus-per-task gres gres-flags help hint hold ignore-pbs
immediate input job-name kill-on-invalid-dep licenses mail-type mail-user mcs-label mem mem-bind mem-per-cpu
mem-per-gpu mincpus network nice no-kill no-requeue nodefile nodelist nodes ntasks ntasks-per-core
ntasks-per-gpu ntasks-per-node ntasks-per-socket open-mode output overcommit oversubscribe parsable partition
power prefer priority profile propagate qos quiet reboot requeue reservation resv-ports segment signal
sockets-per-node spread-job switches test-only thread-spec threads-per-core time time-min tmp tres-bind
tres-per-task uid usage use-min-nodes verbose version wait wait-all-nodes wckey workdir wrap
""".split()) | OWNED
# Short options: the owned ones, and those known to take a required argument (the rest of a bundle is then
# their value). A letter not listed is read as a flag, so the scan goes on: a doubt refuses, it never admits.
SHORT_OWNED = {"a": "array", "d": "dependency", "D": "chdir", "e": "error", "J": "job-name", "N": "nodes",
               "n": "ntasks", "o": "output"}
SHORT_WITH_VALUE = set("AbcCGiLmMpqStwx")


def value_problem(key: str, value: str) -> str | None:
    """Why `value` cannot go on an #SBATCH line for `slurm.<key>`, or None."""
    pattern, what = PATTERNS[key]
    if re.fullmatch(pattern, value):
        return None
    return (f"{value!r} is not allowed in a batch script (expected {what}, one token of letters, digits "
            "and . _ - , :)")


def _long_owner(name: str) -> str | None:
    """The owned option `--name` stands for in sbatch's reading (an exact name, else every option it prefixes)."""
    if name in SBATCH_LONG:
        return name if name in OWNED else None
    owned = sorted(o for o in OWNED if o.startswith(name))
    return owned[0] if owned else None


def option_problem(option: str) -> str | None:
    """Why `option` cannot be one of slurm.extra_sbatch, or None."""
    text = option.strip()
    long, short = _LONG.fullmatch(text), _SHORT.fullmatch(text)
    if long:
        owner = _long_owner(long.group(1))
        spelled = "" if owner == long.group(1) else f" (sbatch reads --{long.group(1)} as --{owner})"
    elif short:
        owner = None
        bundle = short.group(1) + (short.group(2) or "")
        for letter in bundle:
            if letter in SHORT_OWNED:
                owner = SHORT_OWNED[letter]
                break
            if letter in SHORT_WITH_VALUE:
                break
        spelled = f" (sbatch reads -{letter} as --{owner})" if owner else ""
    else:
        return (f"{option!r} is not one sbatch option of the form --name, --name=value or -X[value] (value one "
                "token of letters, digits and . _ - , : + = / @)")
    if owner:
        return f"--{owner}{spelled} is set by scratchgpt itself; use the matching slurm.* key or remove it"
    return None


def setup_problem(setup: str) -> str | None:
    """The set-up line must be one line of valid shell; it runs as written (it is the user's own command)."""
    if any(ch in setup for ch in "\n\r\0"):
        return "must be one line (no newline, carriage return or NUL); join commands with ; or &&"
    bash = shutil.which("bash")
    if bash:
        out = subprocess.run([bash, "-n", "-c", setup], capture_output=True, text=True, timeout=10)
        if out.returncode:
            return f"not valid shell: {out.stderr.strip()}"
    return None
