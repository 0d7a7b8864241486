"""`recipe run NAME --container`: the docker/podman command, and what happens where no engine answers."""

from __future__ import annotations

import os
import shlex
import stat
from pathlib import Path

import pytest

from runner import container
from runner.container import NO_ENGINE, container_command, run_in_container

REPO = Path(__file__).resolve().parent.parent
SECRET = "hf_secretvalue_never_on_a_command_line"


@pytest.fixture(autouse=True)
def host_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("RECIPE_CACHE", str(tmp_path / "recipe-cache"))


def mounts(command: list[str]) -> dict[str, str]:
    """container path -> host path of every -v."""
    found = {}
    for flag, value in zip(command, command[1:], strict=False):
        if flag == "-v":
            host, inside = value.split(":")[:2]
            found[inside] = host
    return found


def test_docker_command_has_gpu_mounts_token_by_name_and_the_same_recipe_args(tmp_path):
    command = container_command("tiny_llama_lora", ["train.epochs=1", "--force", "train"], repo=REPO)
    assert command[:3] == ["docker", "run", "--rm"]
    assert command[command.index("--gpus") + 1] == "all"
    assert command[command.index("--user") + 1] == f"{os.getuid()}:{os.getgid()}"
    assert mounts(command) == {"/work": str(REPO), "/data/hf": str(tmp_path / "hf"),
                               "/data/recipe-cache": str(tmp_path / "recipe-cache")}
    assert command[command.index("-w") + 1] == "/work"
    at = command.index(container.IMAGE)
    assert command[at + 1:] == ["run", "tiny_llama_lora", "train.epochs=1", "--force", "train"]
    assert "HF_TOKEN" in [command[i + 1] for i, flag in enumerate(command) if flag == "-e"]
    assert not any(SECRET in part for part in command)
    assert SECRET not in shlex.join(command)


def test_podman_uses_cdi_devices_and_keeps_the_user():
    command = container_command("quickstart", engine="podman", repo=REPO)
    assert command[:2] == ["podman", "run"]
    assert command[command.index("--device") + 1] == "nvidia.com/gpu=all"
    assert "--gpus" not in command and "--userns=keep-id" in command
    assert not any(SECRET in part for part in command)


def test_unset_secrets_are_not_passed_and_set_ones_only_by_name(monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    command = container_command("quickstart", repo=REPO)
    passed = [command[i + 1] for i, flag in enumerate(command) if flag == "-e"]
    assert "HF_TOKEN" not in passed and "HF_HUB_OFFLINE" in passed
    assert all("=" not in name for name in passed if name.startswith("HF_"))


def test_recipe_paths_are_translated_into_the_container(tmp_path):
    inside = container_command(REPO / "recipes" / "quickstart.yaml", repo=REPO)
    assert inside[-1] == "/work/recipes/quickstart.yaml"
    outside = tmp_path / "mine.yaml"
    outside.write_text("name: mine\n")
    command = container_command(outside, repo=REPO)
    assert command[-1] == "/mnt/recipe/mine.yaml"
    assert f"{tmp_path}:/mnt/recipe:ro" in command


def test_unknown_engine_is_refused():
    with pytest.raises(ValueError, match="unknown container engine"):
        container_command("quickstart", engine="lxc")


def fake_engine(folder: Path, name: str, info_code: int, log: Path) -> None:
    script = folder / name
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\n[ "$1" = info ] && exit {info_code}\nexit 7\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_no_engine_prints_the_exact_command_and_fails(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    lines: list[str] = []
    code = run_in_container("quickstart", ["train.epochs=1"], repo=REPO, echo=lines.append)
    assert code == NO_ENGINE != 0
    assert "no container engine answers here" in lines[0]
    assert lines[1].strip() == shlex.join(container_command("quickstart", ["train.epochs=1"], repo=REPO))
    assert SECRET not in "\n".join(lines)


def test_a_client_whose_daemon_does_not_answer_counts_as_no_engine(monkeypatch, tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    fake_engine(bin_dir, "docker", 1, log)  # the docker client is installed, `docker info` fails: no daemon
    monkeypatch.setenv("PATH", str(bin_dir))
    lines: list[str] = []
    assert run_in_container("quickstart", repo=REPO, echo=lines.append) == NO_ENGINE
    assert log.read_text().splitlines() == ["info"]  # asked, never ran anything
    assert "docker run --rm" in lines[1]


def test_an_engine_that_answers_runs_the_command_and_returns_its_code(monkeypatch, tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    fake_engine(bin_dir, "podman", 0, log)
    monkeypatch.setenv("PATH", str(bin_dir))
    lines: list[str] = []
    assert run_in_container("quickstart", ["--dry-run"], repo=REPO, echo=lines.append) == 7
    calls = log.read_text().splitlines()
    assert calls[0] == "info" and calls[1].startswith("run --rm") and calls[1].endswith("run quickstart --dry-run")
    assert (tmp_path / "hf").is_dir() and (tmp_path / "recipe-cache").is_dir()  # created by us, not by the engine as root
    assert SECRET not in "\n".join(calls + lines)


def test_a_hub_cache_moved_by_hf_hub_cache_is_mounted_where_the_container_looks(tmp_path, monkeypatch):
    """huggingface_hub reads models from $HF_HUB_CACHE when it is set; the container must see that folder, not an
    empty hub/ under HF_HOME (which would download every model again, or fail offline)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere" / "hub"))
    command = container_command("tiny_llama_lora", [], repo=REPO)
    assert mounts(command)["/data/hf/hub"] == str(tmp_path / "elsewhere" / "hub")
    assert mounts(command)["/data/hf"] == str(tmp_path / "hf")


@pytest.mark.parametrize("argv", [["run", "--container"], ["run", "--container", "--force", "train"]])
def test_container_without_a_recipe_is_one_clear_line_and_exit_2(argv, capsys, monkeypatch, tmp_path):
    from runner.cli import main

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # nothing may be started, engine or not
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines() == [
        "error: `recipe run --container` needs a recipe name first: recipe run NAME --container [field=value ...]"]
