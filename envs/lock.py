"""Resolve every envs/NAME.in into envs/NAME.txt: every package pinned exactly, reproducibly (stdlib only).

    python envs/lock.py [NAME ...] [--check] [--find-links DIR ...]      (`nox -s lock` runs it with the pinned pip)

How: pip's own resolver in dry-run/report mode (`pip install --dry-run --ignore-installed --report`), wheels only, for the
target platform below whatever machine runs it, ignoring the machine's pip configuration (--isolated), and only
considering files uploaded before CUTOFF. The same inputs (the .in files, CUTOFF, the pip version) give the same files,
byte for byte: no timestamps, names normalized, lines sorted. To move pins forward, edit the .in files and/or CUTOFF.

PyTorch's indexes give no upload times, and pip refuses --uploaded-prior-to with an index that gives none, so such an
index never takes part in a resolution: the variant's exactly pinned torch build enters it as a metadata-only stub wheel
carrying the real wheel's Requires-Dist (read from the index), or the stand-in's where the index cannot be reached.

Directives in a .in file (comments, so pip ignores them):
    # index: URL            an extra index the variant needs (torch builds); recorded in the .txt for nox to pass on
    # stand-in: FILE        where the index cannot be reached: Requires-Dist lines to use for the pinned torch build
                            instead of the wheel's own (a metadata-only stub wheel); the .txt header then says so
    # constrain: NAME.txt   packages shared with that file keep its versions (torch and onnxruntime excepted)
    # on-top-of: NAME.txt   installed together with that file: constrained by it; the .txt lists only the rest

--find-links DIR: a local folder holding copies of the files of an index that cannot be reached (here: the CPU torch
wheel); used only for a variant whose `# index:` is unreachable and has no stand-in. It changes where files come from,
not which versions are chosen, as long as it holds nothing the index does not.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

ENVS = Path(__file__).resolve().parent
VARIANTS = ("cpu", "dev", "cuda13", "ray")  # in dependency order: dev, ray and the CUDA files are constrained by cpu.txt
PIP_VERSION = "26.3"  # --uploaded-prior-to and PEP 658 metadata (no 500 MB wheel downloads) need a recent pip
CUTOFF = "2026-12-01T00:00:00Z"
PYTHON = "3.11"
ABI = "cp311"
GLIBC_MAX = 28  # manylinux_2_28: torch's own baseline; every pin then has a wheel for glibc >= 2.28
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(GLIBC_MAX, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
UNSHARED = re.compile(r"^(torch|onnxruntime(-gpu)?)$")  # differ between variants by design; never constrained
PYPI = "PyPI (https://pypi.org/simple)"


@dataclass
class Spec:
    name: str
    index: str | None = None
    stand_in: Path | None = None
    constrain: str | None = None
    on_top_of: str | None = None
    pins: dict[str, str] = field(default_factory=dict)  # top-level name==version lines, for the stand-in's torch

    @classmethod
    def read(cls, name: str) -> Spec:
        spec = cls(name)
        for path in _in_files(ENVS / f"{name}.in"):
            for line in path.read_text().splitlines():
                directive = re.match(r"#\s*(index|stand-in|constrain|on-top-of):\s*(\S+)\s*$", line)
                if directive and path.name == f"{name}.in":
                    key, value = directive.groups()
                    if key == "index":
                        spec.index = value
                    elif key == "stand-in":
                        spec.stand_in = ENVS / value
                    else:
                        setattr(spec, key.replace("-", "_"), value)
                pin = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==(\S+)\s*$", line)
                if pin:
                    spec.pins[normalize(pin.group(1))] = pin.group(3)
        return spec


def _in_files(path: Path) -> list[Path]:
    """The .in file and the files it includes with -r."""
    found = [path]
    for line in path.read_text().splitlines():
        included = re.match(r"-r\s+(\S+)", line.strip())
        if included:
            found += _in_files(path.parent / included.group(1))
    return found


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[normalize(name)] = version
    return pins


def reachable(url: str, timeout: float = 5.0) -> bool:
    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname or "", parsed.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def requires_lines(path: Path) -> list[str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def stub_wheel(folder: Path, name: str, version: str, requires_dist: list[str]) -> Path:
    """A metadata-only wheel that stands in for one pip should not or cannot fetch here (dry runs only, never installed)."""
    extras = sorted({m.group(1) for line in requires_dist for m in [re.search(r'extra == "([^"]+)"', line)] if m})
    dist_info = f"{name}-{version}.dist-info"
    metadata = "\n".join(["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}", "Requires-Python: >=3.10"]
                         + [f"Provides-Extra: {extra}" for extra in extras]
                         + [f"Requires-Dist: {line}" for line in requires_dist]) + "\n"
    wheel_meta = "Wheel-Version: 1.0\nGenerator: envs/lock.py\nRoot-Is-Purelib: false\nTag: cp311-cp311-manylinux_2_28_x86_64\n"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-cp311-cp311-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{dist_info}/METADATA", metadata)
        wheel.writestr(f"{dist_info}/WHEEL", wheel_meta)
        wheel.writestr(f"{dist_info}/RECORD", f"{dist_info}/METADATA,,\n{dist_info}/WHEEL,,\n{dist_info}/RECORD,,\n")
    return path


def pip_dry_run(work: Path, report: Path, *args: str) -> dict:
    """`pip install --dry-run --report` for the target platform, ignoring this machine's pip configuration."""
    command = [sys.executable, "-m", "pip", "install", "--isolated", "--disable-pip-version-check", "--dry-run",
               "--ignore-installed", "--quiet", "--only-binary=:all:", "--python-version", PYTHON,
               "--implementation", "cp", "--abi", ABI, "--target", str(work / "target"), "--report", str(report)]
    command += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    done = subprocess.run(command + list(args), text=True, capture_output=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"pip could not resolve {' '.join(args[-2:])} (exit {done.returncode})")
    return json.loads(report.read_text())


def index_requires(index: str, name: str, version: str, work: Path) -> list[str]:
    """The Requires-Dist of NAME==VERSION's wheel on INDEX (PEP 658 metadata: no wheel download where it is served)."""
    report = pip_dry_run(work, work / f"{name}-metadata.json", "--no-deps", "--index-url", index, f"{name}=={version}")
    return list(report["install"][0]["metadata"].get("requires_dist", []))


def resolve(spec: Spec, find_links: list[str], work: Path) -> tuple[dict[str, str], list[str]]:
    """Pins (normalized name -> version) of the whole resolved environment, and header notes on how they were found.

    A variant's torch build lives on PyTorch's index, which gives no upload times (pip refuses --uploaded-prior-to with
    it), so that index never takes part in the resolution: the pinned torch enters as a metadata-only stub wheel built
    from the real wheel's metadata where the index answers, or from the stand-in file where it does not."""
    notes: list[str] = []
    sources = [PYPI]
    args = ["--uploaded-prior-to", CUTOFF]
    if spec.index:
        torch = spec.pins["torch"]
        sources.append(f"torch {torch} from {spec.index}")
        if reachable(spec.index):
            requires = index_requires(spec.index, "torch", torch, work)
            stub_wheel(work / "torch-metadata", "torch", torch, requires)
            args += ["--find-links", str(work / "torch-metadata")]
            if spec.stand_in and sorted(requires) != sorted(requires_lines(spec.stand_in)):
                print(f"  note: {spec.stand_in.relative_to(ENVS)} differs from the wheel's metadata; update it:")
                print("\n".join(f"    {line}" for line in requires))
        elif spec.stand_in:
            stub_wheel(work / "torch-metadata", "torch", torch, requires_lines(spec.stand_in))
            args += ["--find-links", str(work / "torch-metadata")]
            notes += [f"NOT VERIFIED: {spec.index} could not be reached where this file was generated: the torch {torch}",
                      "  wheel was not fetched (public reports of installing it from that index are the evidence it exists),",
                      f"  and its own dependencies come from envs/{spec.stand_in.relative_to(ENVS)} (a transcription;",
                      "  see its header), not from the wheel. Re-run `nox -s lock` where that index answers."]
            print(f"  {spec.index} unreachable: using the stand-in metadata in {spec.stand_in.relative_to(ENVS)}")
        elif find_links:  # only here: a local copy of PyTorch's CPU wheel must not stand in for PyPI's CUDA torch
            print(f"  {spec.index} unreachable: taking its files from --find-links {' '.join(find_links)}")
            args += [arg for folder in find_links for arg in ("--find-links", folder)]
        else:
            raise SystemExit(f"{spec.name}: {spec.index} cannot be reached and no --find-links folder holds its files")
    base = spec.constrain or spec.on_top_of
    if base:
        constraints = work / f"{spec.name}-constraints.txt"
        shared = {n: v for n, v in read_pins(ENVS / base).items() if spec.on_top_of or not UNSHARED.match(n)}
        constraints.write_text("".join(f"{n}=={v}\n" for n, v in sorted(shared.items())))
        args += ["-c", str(constraints)]
    report = pip_dry_run(work, work / f"{spec.name}.json", *args, "-r", str(ENVS / f"{spec.name}.in"))
    pins = {normalize(item["metadata"]["name"]): item["metadata"]["version"] for item in report["install"]}
    if spec.on_top_of:
        below = read_pins(ENVS / spec.on_top_of)
        pins = {n: v for n, v in pins.items() if n not in below}
    return pins, [f"Sources: {', '.join(sources)}."] + notes


def render(spec: Spec, pins: dict[str, str], notes: list[str]) -> str:
    header = [
        f"# envs/{spec.name}.txt: the {spec.name} environment, every package pinned (name==version; normalized, sorted).",
        f"# Generated from envs/{spec.name}.in by `nox -s lock` (envs/lock.py). Do not edit: edit the .in, then re-lock.",
        f"# Resolver: pip {PIP_VERSION}, `pip install --isolated --dry-run --report`, wheels only, for CPython {PYTHON} on",
        f"#   Linux x86_64 (manylinux_2_{GLIBC_MAX} and older tags), files uploaded before {CUTOFF}.",
    ]
    header += [f"# {line}" for line in notes]
    if spec.index:
        header.append(f"# extra-index-url: {spec.index}")
    if spec.constrain:
        header.append(f"# Shared packages keep the versions of envs/{spec.constrain} (all but torch and onnxruntime).")
    if spec.on_top_of:
        header.append(f"# Install on top of a runtime file: pip install -r envs/{spec.name}.txt -c envs/{spec.on_top_of}")
        header.append(f"#   (lists only what envs/{spec.on_top_of} does not pin; the CUDA files pin those shared ones alike).")
    else:
        header.append(f"# Install: nox does `pip install -r envs/{spec.name}.txt`; the pins are complete, so"
                      f" `pip install --no-deps` works too.")
    body = [f"{name}=={pins[name]}" for name in sorted(pins)]
    return "\n".join(header + body) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", metavar="NAME",
                        help=f"which files (default: all, in the order {', '.join(VARIANTS)})")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file would change")
    parser.add_argument("--find-links", action="append", default=[], metavar="DIR",
                        help="local folder with copies of an unreachable index's files")
    args = parser.parse_args(argv)
    unknown = [name for name in args.variants if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown environment(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    pip = subprocess.run([sys.executable, "-m", "pip", "--version"], text=True, capture_output=True).stdout.split()
    if len(pip) < 2 or pip[1] != PIP_VERSION:
        raise SystemExit(f"envs/lock.py needs pip {PIP_VERSION} (found {pip[1] if len(pip) > 1 else 'none'}): "
                         f"`nox -s lock` installs it")
    if (f"{sys.version_info[0]}.{sys.version_info[1]}", sys.platform) != (PYTHON, "linux"):
        # pip evaluates environment markers against the interpreter running it, not only the target flags
        raise SystemExit(f"envs/lock.py must run on Python {PYTHON} on Linux (`nox -s lock` does)")
    changed = []
    for name in args.variants or VARIANTS:
        spec = Spec.read(name)
        print(f"locking envs/{name}.txt from envs/{name}.in")
        with tempfile.TemporaryDirectory(prefix=f"lock-{name}-") as work:
            pins, notes = resolve(spec, args.find_links, Path(work))
        text = render(spec, pins, notes)
        target = ENVS / f"{name}.txt"
        if target.is_file() and target.read_text() == text:
            print(f"  unchanged ({len(pins)} packages)")
            continue
        changed.append(name)
        if args.check:
            print(f"  WOULD CHANGE: envs/{name}.txt")
        else:
            target.write_text(text)
            print(f"  written ({len(pins)} packages)")
    if args.check and changed:
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
