"""Hardware check for GPU runners (`nox -s hwcheck` runs it): can this machine run the recipes, and does the GPU stack work?

    python -m runner.hwcheck [--out DIR] [--env cuda13] [--recipes NAME ...] [--steps N] [--device cuda|cpu]

1. the pinned stack: torch is a CUDA build of the env's CUDA major, bitsandbytes and ONNX Runtime see the GPU;
2. `recipe doctor NAME --json` for every recipe (a recipe that does not fit this machine fails its case, with the doctor's
   findings and remedies in the JSON; one whose local model is absent is a skipped case). With `--device cpu`, a recipe
   that requires CUDA is judged against `--gpu-profile` (default a100-40gb) instead of this machine;
3. micro-smoke, QLoRA: a tiny Llama built from a config, loaded in 4-bit NF4 through bitsandbytes and wrapped in LoRA on
   q/v by the train stage's own code (runner.stages.train.build.build_model); no-grad forwards first (an evaluation and a
   short generation: the inference kernels, after which bitsandbytes' CPU layout cuts 4-bit layers' gradients), then a
   few training steps under the train stage's gradient guard; the adapter must move and the eval loss must fall;
4. micro-smoke, ONNX Runtime: a tiny model exported with torch.onnx, run in a CUDAExecutionProvider session (a session
   that silently fell back to CPU fails), outputs compared with torch.

Writes DIR/hwcheck.json and DIR/hwcheck-junit.xml. Exit codes: 0 all passed, 1 a check failed, 3 no NVIDIA GPU here (the
files then hold one skipped case saying so), 4 the NVIDIA driver is older than the env's `# min-driver:` (checked before
torch is imported; one failed case names both versions). `--device cpu` rehearses the smoke code on a machine without a GPU (the
stack check then only records versions).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from runner.hardware.driver import driver_problem, installed_driver
from runner.hardware.platform_facts import nvidia_smi

NO_GPU = 3
OLD_DRIVER = 4
EXPECTED_CUDA_MAJOR = {"cuda13": "13"}


@dataclass
class Check:
    group: str  # JUnit classname: environment, doctor, smoke
    name: str
    status: str = "passed"  # passed | failed | error | skipped
    seconds: float = 0.0
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)


class CheckFailed(Exception):
    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details = details or {}


class CheckSkipped(CheckFailed):
    """Nothing to judge here (a recipe whose local model is absent): reported, not a failure."""


def run_check(group: str, name: str, func: Callable[[], dict[str, Any]]) -> Check:
    """Run one check: it returns details, raises CheckFailed (a failure) or anything else (an error)."""
    check = Check(group, name)
    started = time.perf_counter()
    try:
        check.details = func() or {}
    except CheckSkipped as exc:
        check.status, check.message, check.details = "skipped", str(exc), exc.details
    except CheckFailed as exc:
        check.status, check.message, check.details = "failed", str(exc), exc.details
    except Exception as exc:  # noqa: BLE001 - every error becomes a reported case, the next check still runs
        check.status, check.message = "error", f"{type(exc).__name__}: {exc}"
        check.details = {"traceback": traceback.format_exc(limit=8)}
    check.seconds = round(time.perf_counter() - started, 3)
    mark = {"passed": "ok  ", "failed": "FAIL", "error": "ERR ", "skipped": "skip"}[check.status]
    print(f"[{mark}] {group}.{name} ({check.seconds:.1f} s){': ' + check.message if check.message else ''}", flush=True)
    return check


def gpu_names() -> list[str]:
    try:
        listed = nvidia_smi("-L", timeout=30) or ""
    except (OSError, subprocess.SubprocessError):  # it failed, exited non-zero or timed out: ask the driver's folder
        listed = ""
    names = [line for line in listed.splitlines() if line.startswith("GPU ")]
    if names:
        return names
    gpus = Path("/proc/driver/nvidia/gpus")
    return [p.name for p in gpus.iterdir()] if gpus.is_dir() else []


# --- 1. the pinned stack -------------------------------------------------------------------------------------------------


def check_stack(env: str, device: str) -> dict[str, Any]:
    import bitsandbytes
    import onnxruntime as ort
    import torch

    details: dict[str, Any] = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                               "bitsandbytes": bitsandbytes.__version__, "onnxruntime": ort.__version__,
                               "onnxruntime_providers": ort.get_available_providers()}
    if device == "cpu":
        return details
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build (pip took it from a local wheel or index?)")
    elif env in EXPECTED_CUDA_MAJOR and not torch.version.cuda.startswith(EXPECTED_CUDA_MAJOR[env] + "."):
        problems.append(f"torch is built for CUDA {torch.version.cuda}, env {env} expects CUDA {EXPECTED_CUDA_MAJOR[env]}")
    if torch.version.cuda is not None and not torch.cuda.is_available():
        problems.append("torch.cuda.is_available() is False: driver too old for this CUDA build, or no device visible")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        details |= {"device": props.name, "memory_gib": round(props.total_memory / 2**30, 2),
                    "compute_capability": f"{props.major}.{props.minor}", "bf16": torch.cuda.is_bf16_supported(),
                    "devices": torch.cuda.device_count()}
    if "CUDAExecutionProvider" not in details["onnxruntime_providers"]:
        problems.append("ONNX Runtime has no CUDAExecutionProvider (the CPU onnxruntime package is installed?)")
    if problems:
        raise CheckFailed("; ".join(problems), details)
    return details


# --- 2. the doctor -------------------------------------------------------------------------------------------------------


def check_doctor(recipe: Path, out: Path, profile: str | None = None) -> dict[str, Any]:
    """`recipe doctor RECIPE --json [--profile NAME]`; the document goes to OUT/doctor-NAME.json. Exit 1 (does not fit)
    fails the case; a recipe the doctor could not judge (its local model is absent) is a skipped case."""
    script = shutil.which("recipe")
    command = [script or "recipe", "doctor", str(recipe), "--json", *(["--profile", profile] if profile else [])]
    done = subprocess.run(command, capture_output=True, text=True) if script else None
    if done is None or (done.returncode == 2 and "invalid choice: 'doctor'" in done.stderr):  # no CLI with the doctor
        from runner.hardware.doctor import doctor

        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = doctor([str(recipe)], json_output=True, profile=profile)
        done = subprocess.CompletedProcess(command, code, buffer.getvalue(), "")
    name = f"{recipe.stem}@{profile}" if profile else recipe.stem
    (out / f"doctor-{name}.json").write_text(done.stdout)
    try:
        document = json.loads(done.stdout)
    except ValueError:
        document = {}
    verdicts = document.get("verdicts") or [{}]
    details = {"exit_code": done.returncode, "fits": verdicts[0].get("fits"), "estimate_gib": _peak_gib(verdicts[0]),
               "capacity_gib": verdicts[0].get("capacity_gib"), "machine": verdicts[0].get("machine"),
               "file": f"doctor-{name}.json"}
    if done.returncode == 1:
        failing = [f"{f.get('check')}: {f.get('detail')}" for f in verdicts[0].get("findings", []) if f.get("status") == "fail"]
        raise CheckFailed(f"{recipe.stem} does not fit {'profile ' + profile if profile else 'this machine'}: "
                          + "; ".join(failing), details)
    if done.returncode != 0:
        raise CheckFailed(f"recipe doctor exited {done.returncode}: {(done.stderr or done.stdout).strip()[-500:]}", details)
    if document.get("not_checked"):
        raise CheckSkipped(document["not_checked"][0]["reason"], details)
    return details


def needs_cuda(recipe: Path) -> bool:
    """Whether the recipe says `requires.accelerator: cuda` (False when it does not load: the doctor then says why)."""
    from runner.recipe import RecipeError, load_recipe

    try:
        return load_recipe(recipe).recipe.requires.accelerator == "cuda"
    except RecipeError:
        return False


def _peak_gib(verdict: dict[str, Any]) -> float | None:
    estimate = verdict.get("estimate") or {}
    return round(estimate["peak_bytes"] / 2**30, 3) if "peak_bytes" in estimate else None


# --- 3. QLoRA micro-smoke ------------------------------------------------------------------------------------------------


def check_qlora(device: str, bits: int, steps: int, work: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from runner.recipe.sections import Model, QloraTrain
    from runner.stages.train.build import build_model
    from runner.stages.train.guard import GUARD_STEPS, GradientGuard
    from runner.stages.train.job import Job

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(work / "tiny-llama")  # then loaded through from_pretrained, like hub ids
    cuda = device == "cuda"
    bf16 = cuda and torch.cuda.is_bf16_supported()
    compute = torch.bfloat16 if bf16 else (torch.float16 if cuda else torch.float32)
    # The model is built by the train stage's own code (quantized load, prepare_model_for_kbit_training, LoRA, the
    # 4-bit layout fix), from a QLoRA section as a recipe writes it: this smoke checks what recipes run.
    train = QloraTrain.model_validate({
        "method": "qlora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "quantization": {"bits": bits, "compute_dtype": str(compute).removeprefix("torch.")},
        "gradient_checkpointing": True, "batch_size": 8, "learning_rate": 2e-3, "max_steps": steps})
    job = Job(model=Model.model_validate({"path": str(work / "tiny-llama"), "task": "causal-lm"}), train=train, seed=0,
              inputs={}, out=work / "out", batch_size=train.batch_size, accumulation=1)
    model: Any = build_model(job, None, None)  # a peft model: generate() and .device, which nn.Module does not declare
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (64, 32), generator=generator)
    rows = {"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist(), "labels": tokens.tolist()}
    data = Dataset.from_dict(rows)
    args = TrainingArguments(output_dir=str(work / "out"), max_steps=steps, per_device_train_batch_size=8,
                             per_device_eval_batch_size=16, learning_rate=2e-3, logging_steps=1, save_strategy="no",
                             report_to=[], bf16=bf16, fp16=cuda and not bf16, use_cpu=not cuda, seed=0,
                             gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data.select(range(16)),
                      callbacks=[GradientGuard(GUARD_STEPS)])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = trainer.evaluate()["eval_loss"]  # no-grad forwards first, as the train stage does, and one-token steps
    with torch.no_grad():  # (generation runs the 4-bit inference kernels)
        model.generate(input_ids=tokens[:1, :4].to(model.device), max_new_tokens=3, do_sample=False)
    trainer.train()  # the guard raises if the first optimizer steps get no usable gradient
    after = trainer.evaluate()["eval_loss"]
    moved = max(float(p.detach().float().abs().max()) for n, p in model.named_parameters() if "lora_B" in n)
    losses = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
    details = {"bits": bits, "compute_dtype": str(compute).removeprefix("torch."), "steps": steps,
               "eval_loss_before": round(before, 4), "eval_loss_after": round(after, 4), "train_losses": losses,
               "lora_B_max_abs": moved, "peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None}
    if moved == 0.0:
        raise CheckFailed("the LoRA adapter did not move: every update was zero", details)
    if not all(map(_finite, losses + [after])):
        raise CheckFailed("a loss was not finite", details)
    if after >= before:
        raise CheckFailed(f"the eval loss did not fall ({before:.4f} -> {after:.4f}): the adapter learned nothing", details)
    return details


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


# --- 4. ONNX Runtime micro-smoke -----------------------------------------------------------------------------------------


def check_onnxruntime(device: str, work: Path) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 4)).eval()
    x = torch.randn(8, 16)
    path = work / "tiny.onnx"
    exporter = "dynamo"
    try:
        torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"], opset_version=18,
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception:  # noqa: BLE001 - the TorchScript exporter still covers a plain MLP
        exporter = "torchscript"
        torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"], opset_version=18,
                          dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    preload = None
    if device == "cuda" and hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()  # the CUDA/cuDNN libraries from the nvidia-* wheels torch also uses
            preload = "ok"
        except Exception as exc:  # noqa: BLE001 - reported; the session below says whether CUDA loaded anyway
            preload = f"{type(exc).__name__}: {exc}"
    wanted = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    session = ort.InferenceSession(str(path), providers=[wanted, "CPUExecutionProvider"])
    providers = session.get_providers()
    feed = {"x": x.numpy()}
    got = session.run(None, feed)[0]
    timings = []
    for _ in range(20):
        started = time.perf_counter()
        session.run(None, feed)
        timings.append((time.perf_counter() - started) * 1000)
    with torch.no_grad():
        diff = float(np.abs(got - model(x).numpy()).max())
    details = {"exporter": exporter, "providers": providers, "preload_dlls": preload, "max_abs_diff": diff,
               "median_ms": round(sorted(timings)[len(timings) // 2], 3)}
    if providers[0] != wanted:
        raise CheckFailed(f"ONNX Runtime fell back to {providers[0]}: the {wanted} could not be created "
                          "(CUDA/cuDNN libraries not found or wrong major version; see the log above)", details)
    if diff > 1e-3:
        raise CheckFailed(f"ONNX Runtime output differs from torch by {diff:.2e}", details)
    return details


# --- output --------------------------------------------------------------------------------------------------------------


def write_results(out: Path, env: str, checks: list[Check], started: str, exit_code: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    document = {"env": env, "started": started, "host": socket.gethostname(), "python": platform.python_version(),
                "gpus": gpu_names(), "exit_code": exit_code, "passed": exit_code == 0,
                "checks": [asdict(c) for c in checks]}
    (out / "hwcheck.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
    count = {s: sum(c.status == s for c in checks) for s in ("failed", "error", "skipped")}
    total = f"{sum(c.seconds for c in checks):.3f}"
    suites = ET.Element("testsuites", name="hwcheck", tests=str(len(checks)), failures=str(count["failed"]),
                        errors=str(count["error"]), skipped=str(count["skipped"]), time=total)
    suite = ET.SubElement(suites, "testsuite", name=f"hwcheck-{env}", tests=str(len(checks)),
                          failures=str(count["failed"]), errors=str(count["error"]), skipped=str(count["skipped"]),
                          time=total, timestamp=started, hostname=socket.gethostname())
    properties = ET.SubElement(suite, "properties")
    ET.SubElement(properties, "property", name="env", value=env)
    for name in gpu_names():
        ET.SubElement(properties, "property", name="gpu", value=name)
    for c in checks:
        case = ET.SubElement(suite, "testcase", classname=f"hwcheck.{c.group}", name=c.name, time=f"{c.seconds:.3f}")
        if c.status in ("failed", "error", "skipped"):
            tag = {"failed": "failure", "error": "error", "skipped": "skipped"}[c.status]
            element = ET.SubElement(case, tag, message=c.message)
            element.text = json.dumps(c.details, indent=2, default=str)
        else:
            ET.SubElement(case, "system-out").text = json.dumps(c.details, indent=2, default=str)
    ET.indent(suites)
    ET.ElementTree(suites).write(out / "hwcheck-junit.xml", encoding="utf-8", xml_declaration=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.hwcheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/hwcheck"), help="folder for the JSON and JUnit files")
    parser.add_argument("--env", default="cuda13", help="the envs/ file installed (checks torch's CUDA major)")
    parser.add_argument("--recipes", nargs="*", help="recipes for the doctor (default: every recipes/*.yaml)")
    parser.add_argument("--steps", type=int, default=6, help="QLoRA optimizer steps (default 6)")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4, help="QLoRA base quantization (default 4)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: rehearse the smoke code on a machine without a GPU")
    parser.add_argument("--gpu-profile", default="a100-40gb",
                        help="with --device cpu: the hardware profile CUDA recipes are judged against (runner/profiles)")
    args = parser.parse_args(argv)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    if args.device == "cuda" and not gpu_names():
        message = ("no NVIDIA GPU on this machine (no working nvidia-smi, no /proc/driver/nvidia/gpus): nothing checked. "
                   f"Exit code {NO_GPU} means exactly this.")
        print(f"hwcheck: {message}", file=sys.stderr)
        write_results(args.out, args.env, [Check("environment", "gpu-present", "skipped", 0.0, message)], started, NO_GPU)
        return NO_GPU
    if args.device == "cuda":
        found = installed_driver()
        problem = driver_problem(args.env, found)
        if problem:
            print(f"hwcheck: {problem}", file=sys.stderr)
            write_results(args.out, args.env, [Check("environment", "driver", "failed", 0.0, problem,
                                                     {"driver": found})], started, OLD_DRIVER)
            return OLD_DRIVER
    args.out.mkdir(parents=True, exist_ok=True)
    recipes = [Path(r) if Path(r).is_file() else Path("recipes") / f"{r}.yaml" for r in args.recipes or []]
    recipes = recipes or sorted(Path("recipes").glob("*.yaml"))
    checks = [run_check("environment", "stack", lambda: check_stack(args.env, args.device))]
    for recipe in recipes:
        # rehearsing on CPU, a CUDA recipe is judged against a named GPU profile: this machine cannot run it
        profile = args.gpu_profile if args.device == "cpu" and needs_cuda(recipe) else None
        name = f"{recipe.stem}@{profile}" if profile else recipe.stem
        checks.append(run_check("doctor", name, partial(check_doctor, recipe, args.out, profile)))
    with tempfile.TemporaryDirectory(prefix="hwcheck-") as work:
        checks.append(run_check("smoke", f"qlora-{args.bits}bit",
                                lambda: check_qlora(args.device, args.bits, args.steps, Path(work) / "qlora")))
        checks.append(run_check("smoke", f"onnxruntime-{args.device}",
                                lambda: check_onnxruntime(args.device, Path(work))))
    code = 0 if all(c.status in ("passed", "skipped") for c in checks) else 1
    write_results(args.out, args.env, checks, started, code)
    print(f"hwcheck: {sum(c.status == 'passed' for c in checks)} passed, {sum(c.status == 'skipped' for c in checks)} "
          f"skipped, {sum(c.status in ('failed', 'error') for c in checks)} failed; "
          f"{args.out / 'hwcheck.json'} and {args.out / 'hwcheck-junit.xml'}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
